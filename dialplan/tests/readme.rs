//! Runs every example in dialplan/README.md as written. Each example says, in comments,
//! what its dials answer (`// given:`) and what the run must do (`// expect:`); a README
//! example that stops doing what its page says fails here.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tandem_dialplan::{DialOutcome, DialRequest, DialSpec, Ending, Host, Limits, Mode, Sandbox};

/// Answers dials from the example's `given` lines: a target answers, is busy, does not
/// answer or fails with a code; one not named fails with 404. Groups behave as the
/// README says: parallel answers if any member does, serial tries members in order.
struct Given {
    answers: HashMap<String, DialOutcome>,
    dialled: Mutex<Vec<String>>,
}

impl Given {
    fn outcome(&self, spec: &DialSpec) -> DialOutcome {
        match spec {
            DialSpec::Leg { target, .. } => self
                .answers
                .get(&target.to_string())
                .cloned()
                .unwrap_or(DialOutcome::Failed {
                    code: 404,
                    reason: "Not Found".into(),
                }),
            DialSpec::Group { mode, members, .. } => {
                let outcomes: Vec<DialOutcome> = match mode {
                    Mode::Serial => {
                        let mut seen = Vec::new();
                        for m in members {
                            let o = self.outcome(m);
                            let answered = matches!(o, DialOutcome::Answered { .. });
                            seen.push(o);
                            if answered {
                                break;
                            }
                        }
                        seen
                    }
                    Mode::Parallel => members.iter().map(|m| self.outcome(m)).collect(),
                };
                if let Some(a) = outcomes
                    .iter()
                    .find(|o| matches!(o, DialOutcome::Answered { .. }))
                {
                    return a.clone();
                }
                outcomes.last().cloned().expect("a group has members")
            }
        }
    }
}

impl Host for Given {
    fn dial(&self, request: DialRequest) -> DialOutcome {
        self.dialled
            .lock()
            .unwrap()
            .push(format!("dial {}", request.text));
        self.outcome(&request.spec)
    }

    fn callback(&self, a: &str, b: &str) -> Result<String, String> {
        self.dialled
            .lock()
            .unwrap()
            .push(format!("callback {a} then {b}"));
        Ok("1".into())
    }
}

/// The ```rhai blocks of the README.
fn examples() -> Vec<String> {
    // The package's directory read at run time: the target dir is shared between checkouts
    // at different paths, and a binary built in one must not read another's README.
    let dir: std::path::PathBuf = std::env::var_os("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
        .into();
    let readme = std::fs::read_to_string(dir.join("README.md")).expect("dialplan/README.md");
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```rhai") => current = Some(String::new()),
            (Some(_), "```") => out.push(current.take().unwrap()),
            (Some(block), l) => {
                block.push_str(l);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    out
}

#[test]
fn every_readme_example_does_what_its_page_says() {
    let examples = examples();
    assert!(examples.len() >= 6, "found {} examples", examples.len());
    let sandbox = Sandbox::new(Limits::default());
    for source in &examples {
        let mut call = common::facts();
        let mut answers = HashMap::new();
        let mut expect = None;
        for line in source.lines() {
            if let Some(given) = line.strip_prefix("// given: ") {
                for item in given.split(", ") {
                    let words: Vec<&str> = item.split(' ').collect();
                    match words[..] {
                        ["invite.user", v] => call.user = v.into(),
                        ["invite.direction", v] => call.direction = v.into(),
                        ["invite.from_user", v] => call.from_user = v.into(),
                        [t, "answers"] => {
                            answers.insert(t.into(), DialOutcome::Answered { target: t.into() });
                        }
                        [t, "busy"] => {
                            let busy = DialOutcome::Busy {
                                code: 486,
                                reason: "Busy Here".into(),
                            };
                            answers.insert(t.into(), busy);
                        }
                        [t, "no-answer"] => {
                            answers.insert(t.into(), DialOutcome::NoAnswer);
                        }
                        [t, "fails", code] => {
                            let failed = DialOutcome::Failed {
                                code: code.parse().unwrap(),
                                reason: "Failed".into(),
                            };
                            answers.insert(t.into(), failed);
                        }
                        _ => panic!("cannot read the given {item:?} in:\n{source}"),
                    }
                }
            }
            if let Some(e) = line.strip_prefix("// expect: ") {
                expect = Some(e.to_owned());
            }
        }
        let expect = expect.unwrap_or_else(|| panic!("no // expect: in:\n{source}"));
        let host = Arc::new(Given {
            answers,
            dialled: Mutex::new(Vec::new()),
        });
        let script = sandbox
            .compile(source)
            .unwrap_or_else(|e| panic!("{e} in:\n{source}"));
        let run = sandbox.run(&script, call, host.clone());
        let mut did: Vec<String> = host.dialled.lock().unwrap().to_vec();
        did.push(match &run.result {
            Ok(Ending::Connected { target }) => format!("connected {target}"),
            Ok(Ending::Responded { code, .. }) => format!("respond {code}"),
            Ok(Ending::Ended { .. }) => "ended".into(),
            Ok(Ending::CallerGone) => "caller gone".into(),
            Err(e) => format!("error {e}"),
        });
        assert_eq!(
            did.join(", "),
            expect,
            "the example did not do what it says (trace {:?}):\n{source}",
            run.trace
        );
    }
}
