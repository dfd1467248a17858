//! A memory meter for script runs: a global allocator wrapper that counts, per thread,
//! the bytes allocated less the bytes freed. A run reads its thread's count when it
//! starts and, every 64 operations, stops the script once the count has grown by more
//! than its memory limit.
//!
//! rhai's own size limits do not cover every way a script can grow its data (a map grown
//! one `m[key] = value` at a time is checked only when the map is next passed somewhere),
//! so without this meter a script could hold megabytes until its operation limit. The
//! count is real memory, whatever the interpreter does with it.
//!
//! The binary installs it around its allocator (`node/src/main.rs`); a test binary of
//! this crate installs it around the system's. Where it is not installed the count stays
//! at zero and only rhai's limits apply; [`installed`] says which.
//!
//! This is the crate's only unsafe code: implementing `GlobalAlloc` is unsafe by
//! definition. Each method passes its arguments unchanged to the wrapped allocator and
//! only adds to a thread-local counter (a `Cell` with a const initializer and no
//! destructor, so reading it never allocates and works even while a thread exits).
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;

thread_local! {
    static NET: Cell<i64> = const { Cell::new(0) };
}

fn add(n: i64) {
    let _ = NET.try_with(|c| c.set(c.get().wrapping_add(n)));
}

/// Bytes this thread allocated less the bytes it freed, since it started.
pub fn thread_net_bytes() -> i64 {
    NET.try_with(Cell::get).unwrap_or(0)
}

/// Whether the program's allocator is a [`Metered`] one.
pub fn installed() -> bool {
    let before = thread_net_bytes();
    let probe = std::hint::black_box(vec![0u8; 4096]);
    let grew = thread_net_bytes() - before;
    drop(probe);
    grew >= 4096
}

/// Wraps the allocator `A`, counting per thread. `#[global_allocator] static A:
/// Metered<System> = Metered(System);`
pub struct Metered<A>(pub A);

// SAFETY: every method forwards to `A`, which upholds GlobalAlloc's contract; the only
// addition is arithmetic on a thread-local counter, which neither allocates nor unwinds.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Metered<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees for `layout` are passed on unchanged.
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            add(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for alloc.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator (so by `A`) with `layout`.
        unsafe { self.0.dealloc(ptr, layout) };
        add(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for dealloc, and `new_size` is the caller's, unchanged.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            add(new_size as i64 - layout.size() as i64);
        }
        p
    }
}
