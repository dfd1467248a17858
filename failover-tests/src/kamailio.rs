//! Kamailio (Debian's package) as a VoIP provider in the tests: its registrar with digest
//! authentication (the registration agent's peer) and its proxy, which routes an
//! authenticated user's INVITE to the registered phone of the number it names (the app
//! server's peer). Configured by `fixtures/kamailio-provider.cfg`; started and stopped by
//! the test.

use std::net::SocketAddr;
use std::time::Duration;

use crate::ua::Ua;
use crate::Wait;

/// One Kamailio process, with its own directory for its pid file and log.
pub struct Kamailio {
    child: std::process::Child,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Kamailio {
    pub fn start() -> Kamailio {
        Kamailio::start_on("127.0.0.1", crate::free_port())
    }

    /// Kamailio on `ip:port`; `ip` is also where the test's query REGISTERs come from.
    pub fn start_on(ip: &str, port: u16) -> Kamailio {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let cfg = crate::package_dir().join("fixtures/kamailio-provider.cfg");
        let log = dir.path().join("kamailio.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new("kamailio")
            .arg("-f")
            .arg(&cfg)
            .args([
                "-l",
                &format!("udp:{addr}"),
                "-DD",
                "-E",
                "-m",
                "64",
                "-M",
                "8",
            ])
            .arg("-P")
            .arg(dir.path().join("kamailio.pid"))
            .arg("-Y")
            .arg(dir.path())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("kamailio is installed (./ops/setup.sh installs it)");
        let k = Kamailio { child, addr, dir };
        Wait::new("kamailio to answer", Duration::from_secs(10)).until(|| {
            let mut ua = Ua::new(ip, "probe", "kamailio.test", "pw-probe");
            ua.register(k.addr, "MD5", None, None).status == 200
        });
        k
    }

    /// The contacts of `user@kamailio.test`, as a query REGISTER returns them.
    pub fn contacts(&self, user: &str) -> Vec<String> {
        let ip = self.addr.ip().to_string();
        let mut ua = Ua::new(&ip, user, "kamailio.test", &format!("pw-{user}"));
        let r = ua.register(self.addr, "MD5", None, None);
        assert_eq!(r.status, 200, "{}", r.text);
        r.headers("Contact")
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Kamailio {
    /// Kamailio's log (its stderr): one line per REGISTER and INVITE it took.
    pub fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("kamailio.log")
    }
}
