//! The placement executor: the loop that puts one more copy of a model on the fleet, shared by
//! the operator and the gateway's static mode, and free of I/O. The caller asks for the next
//! step ([`Placer::next`]: plan with the [`planner`](crate::planner) over the fleet as it sees
//! it now), does it (evict, then load), and records the neuron's answer ([`Placer::record`]);
//! the rules of what an answer means live here once:
//!
//! - accepted: the copy is placed there;
//! - no room (409) with the bytes needed: plan again with that size; the neuron is left out when
//!   evicting did not make room, or when it did not say how much it needs;
//! - refused for another reason: a model that fails to load fails everywhere, so the attempt
//!   ends with the neuron's message;
//! - unreachable (or gone while loading): the neuron is left out, and the next one is tried;
//! - after [`Placer::ATTEMPTS`] loads, or when the planner finds no room, the attempt ends with
//!   why, and the last answer.
//!
//! ```
//! use cortex_core::placer::{Answer, Next, Outcome, Placer};
//! use cortex_core::planner::{LoadAsk, NeuronView, Strategy};
//! let fleet = vec![NeuronView { name: "a".into(), ready: true, free: 1 << 30, models: vec![] }];
//! let ask = LoadAsk { model: "m".into(), bytes: None, priority: 0, exclude: vec![] };
//! let mut placer = Placer::new(ask, Strategy::Lru);
//! assert!(matches!(placer.next(&fleet), Next::Load { ref neuron, .. } if neuron == "a"));
//! assert_eq!(placer.record(Answer::Accepted), Outcome::Placed { neuron: "a".into() });
//! ```

use crate::planner::{self, LoadAsk, NeuronView, Plan, Strategy};

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Unload `evict` from `neuron` (in order), then load the model there and record the answer.
    Load { neuron: String, evict: Vec<String> },
    /// Stop: the message says why no copy could be placed.
    GiveUp { message: String },
}

/// What a neuron answered to the load (or what became of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Accepted (202), or already there (200).
    Accepted,
    /// 409: not enough memory; the bytes it needs, when it said.
    NoRoom {
        needed: Option<u64>,
        message: String,
    },
    /// Any other refusal, with the neuron's status and message.
    Refused { status: u16, message: String },
    /// No answer: the neuron is unreachable, or went down while loading.
    Unreachable(String),
}

/// What recording an answer leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The copy is on `neuron`.
    Placed { neuron: String },
    /// Ask for the next step.
    Retry,
    /// The neuron refused the model with `status` and `message`: no other neuron is tried (the
    /// caller words the refusal for its own readers).
    Failed {
        neuron: String,
        status: u16,
        message: String,
    },
}

/// One attempt to place one more copy of a model.
#[derive(Debug, Clone)]
pub struct Placer {
    ask: LoadAsk,
    strategy: Strategy,
    loads: u32,
    /// The step handed out and not yet answered: the neuron, and whether it evicted first.
    current: Option<(String, bool)>,
    /// The last answer, for the message that ends the attempt.
    last: Option<String>,
}

impl Placer {
    /// Loads tried before the attempt gives up.
    pub const ATTEMPTS: u32 = 4;

    pub fn new(ask: LoadAsk, strategy: Strategy) -> Self {
        Placer {
            ask,
            strategy,
            loads: 0,
            current: None,
            last: None,
        }
    }

    /// The neurons left out so far (the caller's own exclusions first).
    pub fn excluded(&self) -> &[String] {
        &self.ask.exclude
    }

    /// The next step over the fleet as the caller sees it now.
    pub fn next(&mut self, neurons: &[NeuronView]) -> Next {
        if self.loads >= Self::ATTEMPTS {
            return Next::GiveUp {
                message: self.last.clone().unwrap_or_default(),
            };
        }
        let (neuron, evict) = match planner::plan_load(neurons, &self.ask, self.strategy) {
            Plan::Load { neuron } => (neuron, Vec::new()),
            Plan::EvictThenLoad { neuron, evict } => (neuron, evict),
            Plan::NoRoom { reason } => {
                let message = match &self.last {
                    Some(last) => format!("{reason}; last attempt: {last}"),
                    None => reason,
                };
                return Next::GiveUp { message };
            }
        };
        self.loads += 1;
        self.current = Some((neuron.clone(), !evict.is_empty()));
        Next::Load { neuron, evict }
    }

    /// Records the answer to the last [`Next::Load`].
    ///
    /// # Panics
    /// When no load was handed out since the last answer.
    pub fn record(&mut self, answer: Answer) -> Outcome {
        let (neuron, evicted) = self
            .current
            .take()
            .expect("Placer::record answers a Next::Load");
        match answer {
            Answer::Accepted => Outcome::Placed { neuron },
            Answer::NoRoom { needed, message } => {
                self.last = Some(format!("{neuron} has no room: {message}"));
                self.ask.bytes = needed.or(self.ask.bytes);
                if evicted || needed.is_none() {
                    self.ask.exclude.push(neuron);
                }
                Outcome::Retry
            }
            Answer::Refused { status, message } => Outcome::Failed {
                neuron,
                status,
                message,
            },
            Answer::Unreachable(why) => {
                self.last = Some(format!("{neuron} unreachable: {why}"));
                self.ask.exclude.push(neuron);
                Outcome::Retry
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::ModelView;

    const GIB: u64 = 1 << 30;

    fn neuron(name: &str, free: u64, models: &[(&str, u64)]) -> NeuronView {
        NeuronView {
            name: name.into(),
            ready: true,
            free,
            models: models
                .iter()
                .map(|(id, bytes)| ModelView {
                    id: id.to_string(),
                    bytes: *bytes,
                    last_used: 0,
                    inflight: 0,
                    pinned: false,
                    priority: 0,
                })
                .collect(),
        }
    }

    fn placer(bytes: Option<u64>) -> Placer {
        let ask = LoadAsk {
            model: "m".into(),
            bytes,
            priority: 0,
            exclude: Vec::new(),
        };
        Placer::new(ask, Strategy::Lru)
    }

    fn load_on(next: Next) -> String {
        match next {
            Next::Load { neuron, .. } => neuron,
            other => panic!("expected a load, got {other:?}"),
        }
    }

    #[test]
    fn an_accepted_load_places_the_copy_there() {
        let mut p = placer(None);
        let fleet = [neuron("a", 2 * GIB, &[]), neuron("b", GIB, &[])];
        assert_eq!(load_on(p.next(&fleet)), "a", "the most free memory first");
        assert_eq!(
            p.record(Answer::Accepted),
            Outcome::Placed { neuron: "a".into() }
        );
    }

    #[test]
    fn no_room_with_the_bytes_needed_plans_again_with_that_size_on_the_same_neuron() {
        let mut p = placer(None);
        let fleet = [neuron("a", 2 * GIB, &[("old", GIB)]), neuron("b", GIB, &[])];
        assert_eq!(load_on(p.next(&fleet)), "a");
        let needed = Some(3 * GIB);
        let answer = Answer::NoRoom {
            needed,
            message: "needs 3 GiB".into(),
        };
        assert_eq!(p.record(answer), Outcome::Retry);
        assert!(
            p.excluded().is_empty(),
            "it did not evict: it stays a candidate"
        );
        // With the size known, only evicting on a makes room there.
        match p.next(&fleet) {
            Next::Load { neuron, evict } => {
                assert_eq!((neuron, evict), ("a".into(), vec!["old".into()]))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_room_after_evicting_leaves_the_neuron_out() {
        let mut p = placer(Some(3 * GIB));
        let fleet = [
            neuron("a", 2 * GIB, &[("old", GIB)]),
            neuron("b", 2 * GIB, &[("x", 2 * GIB)]),
        ];
        let Next::Load { neuron, evict } = p.next(&fleet) else {
            panic!()
        };
        assert!(!evict.is_empty());
        let answer = Answer::NoRoom {
            needed: Some(3 * GIB),
            message: "still no room".into(),
        };
        assert_eq!(p.record(answer), Outcome::Retry);
        assert_eq!(p.excluded(), [neuron]);
    }

    #[test]
    fn no_room_without_the_bytes_needed_leaves_the_neuron_out() {
        let mut p = placer(None);
        let fleet = [neuron("a", 2 * GIB, &[]), neuron("b", GIB, &[])];
        assert_eq!(load_on(p.next(&fleet)), "a");
        let answer = Answer::NoRoom {
            needed: None,
            message: "full".into(),
        };
        assert_eq!(p.record(answer), Outcome::Retry);
        assert_eq!(load_on(p.next(&fleet)), "b");
    }

    #[test]
    fn a_refusal_ends_the_attempt_with_the_neurons_answer() {
        let mut p = placer(None);
        let fleet = [neuron("a", 2 * GIB, &[]), neuron("b", GIB, &[])];
        p.next(&fleet);
        let answer = Answer::Refused {
            status: 422,
            message: "no GGUF file matching quant Q9".into(),
        };
        assert_eq!(
            p.record(answer),
            Outcome::Failed {
                neuron: "a".into(),
                status: 422,
                message: "no GGUF file matching quant Q9".into()
            }
        );
    }

    #[test]
    fn an_unreachable_neuron_is_left_out_and_the_next_one_tried() {
        let mut p = placer(None);
        let fleet = [neuron("a", 2 * GIB, &[]), neuron("b", GIB, &[])];
        p.next(&fleet);
        let outcome = p.record(Answer::Unreachable("connection refused".into()));
        assert_eq!(outcome, Outcome::Retry);
        assert_eq!(load_on(p.next(&fleet)), "b");
    }

    #[test]
    fn when_nothing_is_left_the_planners_reason_comes_with_the_last_answer() {
        let mut p = placer(None);
        let fleet = [neuron("a", 2 * GIB, &[])];
        p.next(&fleet);
        p.record(Answer::Unreachable("connection refused".into()));
        let Next::GiveUp { message } = p.next(&fleet) else {
            panic!()
        };
        assert!(
            message.ends_with("; last attempt: a unreachable: connection refused"),
            "{message}"
        );
    }

    #[test]
    fn the_attempt_gives_up_after_four_loads() {
        let mut p = placer(None);
        let fleet = [neuron("a", 2 * GIB, &[])];
        for _ in 0..Placer::ATTEMPTS {
            assert_eq!(load_on(p.next(&fleet)), "a");
            let answer = Answer::NoRoom {
                needed: Some(GIB),
                message: "busy".into(),
            };
            assert_eq!(p.record(answer), Outcome::Retry);
        }
        assert_eq!(
            p.next(&fleet),
            Next::GiveUp {
                message: "a has no room: busy".into()
            }
        );
    }
}
