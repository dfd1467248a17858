//! openraft's storage conformance suite against the RocksDB log store and state machine,
//! each case on a fresh database in a temporary directory.

use openraft::testing::{StoreBuilder, Suite};
use tandem_raft_store::log_store::LogStore;
use tandem_raft_store::state_machine::StateMachine;
use tandem_raft_store::types::{StorageError, TypeConfig};

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = tandem_raft_store::open(dir.path()).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn passes_the_openraft_storage_suite() {
    Suite::test_all(RocksBuilder).unwrap();
}
