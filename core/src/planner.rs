//! The placement planner: a pure function from what the fleet holds to where a model should be
//! loaded and what must be evicted first. No I/O: the gateway (static mode) and the operator feed
//! it what they observed and carry out the plan.

use serde::{Deserialize, Serialize};

/// How to choose what to evict when nothing fits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Least recently used first.
    #[default]
    Lru,
    /// Lowest priority first (then least recently used); never a higher priority than the newcomer.
    Priority,
}

/// A neuron as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NeuronView {
    pub name: String,
    pub ready: bool,
    /// Free bytes on the device a new model would go to.
    pub free: u64,
    pub models: Vec<ModelView>,
}

/// A model loaded on a neuron.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelView {
    pub id: String,
    pub bytes: u64,
    /// Seconds since the epoch; 0 = never used.
    pub last_used: u64,
    pub inflight: u32,
    pub pinned: bool,
    pub priority: i32,
}

/// A model to place.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadAsk {
    pub model: String,
    /// Bytes the model needs, when known (a neuron's 409 says it).
    pub bytes: Option<u64>,
    pub priority: i32,
    /// Neurons not to use (they hold it already, or refused it).
    pub exclude: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Load on this neuron.
    Load { neuron: String },
    /// Unload these models from the neuron, then load there.
    EvictThenLoad { neuron: String, evict: Vec<String> },
    /// Nowhere to put it; the reason says why.
    NoRoom { reason: String },
}

/// Where to load `ask`: the ready neuron with the most free memory if it fits anywhere (which
/// also spreads replicas), else the neuron where the fewest evictions make room. Pinned models
/// and models with requests in flight are never evicted.
pub fn plan_load(neurons: &[NeuronView], ask: &LoadAsk, strategy: Strategy) -> Plan {
    let candidates: Vec<&NeuronView> = neurons
        .iter()
        .filter(|n| {
            n.ready && !ask.exclude.contains(&n.name) && !n.models.iter().any(|m| m.id == ask.model)
        })
        .collect();
    if candidates.is_empty() {
        return Plan::NoRoom {
            reason: format!(
                "no ready neuron can take '{}' (all are down, excluded or hold it already)",
                ask.model
            ),
        };
    }
    let most_free = candidates.iter().max_by_key(|n| n.free).expect("non-empty");
    let Some(needed) = ask.bytes else {
        return Plan::Load {
            neuron: most_free.name.clone(),
        };
    };
    if most_free.free >= needed {
        return Plan::Load {
            neuron: most_free.name.clone(),
        };
    }
    let mut best: Option<(usize, u64, &str, Vec<String>)> = None;
    for n in &candidates {
        let mut victims: Vec<&ModelView> = n
            .models
            .iter()
            .filter(|m| !m.pinned && m.inflight == 0)
            .filter(|m| strategy == Strategy::Lru || m.priority <= ask.priority)
            .collect();
        match strategy {
            Strategy::Lru => victims.sort_by_key(|m| (m.last_used, m.bytes)),
            Strategy::Priority => victims.sort_by_key(|m| (m.priority, m.last_used)),
        }
        let mut free = n.free;
        let mut evict = Vec::new();
        for v in victims {
            if free >= needed {
                break;
            }
            free += v.bytes;
            evict.push(v.id.clone());
        }
        if free >= needed {
            let freed = free - n.free;
            let better = best
                .as_ref()
                .is_none_or(|(count, bytes, _, _)| (evict.len(), freed) < (*count, *bytes));
            if better {
                best = Some((evict.len(), freed, &n.name, evict));
            }
        }
    }
    match best {
        Some((_, _, neuron, evict)) => Plan::EvictThenLoad {
            neuron: neuron.to_string(),
            evict,
        },
        None => Plan::NoRoom {
            reason: format!(
                "no neuron can free {needed} bytes for '{}': the rest is held by pinned models, models with requests in flight{}",
                ask.model,
                if strategy == Strategy::Priority {
                    " or models of higher priority"
                } else {
                    ""
                }
            ),
        },
    }
}

/// A model to move from one neuron to another: load it on `to`, then unload it from `from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub model: String,
    pub from: String,
    pub to: String,
}

/// Consolidation ("defragmentation"): empties the least-used neuron whose every model fits into
/// the free memory of the other ready neurons that already hold models, so a whole device is free
/// for the next large model. Best fit, largest model first; a model with requests in flight is never
/// moved, and a neuron that could not end empty is left as it is. At most one neuron per call.
pub fn plan_defrag(neurons: &[NeuronView]) -> Vec<Move> {
    let busy: Vec<&NeuronView> = neurons
        .iter()
        .filter(|n| n.ready && !n.models.is_empty())
        .collect();
    let mut sources = busy.clone();
    sources.sort_by_key(|n| n.models.iter().map(|m| m.bytes).sum::<u64>());
    'source: for src in sources {
        if src.models.iter().any(|m| m.inflight > 0) {
            continue;
        }
        let mut free: Vec<(&str, u64, &NeuronView)> = busy
            .iter()
            .filter(|n| n.name != src.name)
            .map(|n| (n.name.as_str(), n.free, *n))
            .collect();
        let mut models: Vec<&ModelView> = src.models.iter().collect();
        models.sort_by_key(|m| std::cmp::Reverse(m.bytes));
        let mut moves = Vec::new();
        for m in models {
            let target = free
                .iter_mut()
                .filter(|(_, f, n)| *f >= m.bytes && !n.models.iter().any(|x| x.id == m.id))
                .min_by_key(|(_, f, _)| *f);
            let Some(t) = target else {
                continue 'source;
            };
            t.1 -= m.bytes;
            moves.push(Move {
                model: m.id.clone(),
                from: src.name.clone(),
                to: t.0.to_string(),
            });
        }
        return moves;
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, bytes: u64, last_used: u64) -> ModelView {
        ModelView {
            id: id.into(),
            bytes,
            last_used,
            inflight: 0,
            pinned: false,
            priority: 0,
        }
    }

    fn n(name: &str, free: u64, models: Vec<ModelView>) -> NeuronView {
        NeuronView {
            name: name.into(),
            ready: true,
            free,
            models,
        }
    }

    fn ask(bytes: u64) -> LoadAsk {
        LoadAsk {
            model: "new".into(),
            bytes: Some(bytes),
            priority: 0,
            exclude: vec![],
        }
    }

    #[test]
    fn the_neuron_with_most_free_memory_takes_a_model_that_fits() {
        let fleet = [n("a", 10, vec![]), n("b", 30, vec![]), n("c", 20, vec![])];
        assert_eq!(
            plan_load(&fleet, &ask(15), Strategy::Lru),
            Plan::Load { neuron: "b".into() }
        );
    }

    #[test]
    fn down_excluded_and_holding_neurons_are_skipped() {
        let mut down = n("down", 100, vec![]);
        down.ready = false;
        let fleet = [
            down,
            n("holds", 100, vec![m("new", 5, 1)]),
            n("x", 100, vec![]),
            n("ok", 50, vec![]),
        ];
        let mut a = ask(10);
        a.exclude = vec!["x".into()];
        assert_eq!(
            plan_load(&fleet, &a, Strategy::Lru),
            Plan::Load {
                neuron: "ok".into()
            }
        );
    }

    #[test]
    fn lru_evicts_the_least_recently_used_first_and_only_as_much_as_needed() {
        let fleet = [n(
            "a",
            5,
            vec![m("old", 10, 100), m("older", 10, 50), m("recent", 10, 900)],
        )];
        assert_eq!(
            plan_load(&fleet, &ask(20), Strategy::Lru),
            Plan::EvictThenLoad {
                neuron: "a".into(),
                evict: vec!["older".into(), "old".into()]
            }
        );
    }

    #[test]
    fn pinned_and_busy_models_are_never_evicted() {
        let mut pinned = m("pinned", 100, 1);
        pinned.pinned = true;
        let mut busy = m("busy", 100, 2);
        busy.inflight = 1;
        let fleet = [n("a", 0, vec![pinned, busy, m("small", 5, 3)])];
        match plan_load(&fleet, &ask(50), Strategy::Lru) {
            Plan::NoRoom { reason } => assert!(reason.contains("pinned"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn priority_evicts_lower_priorities_first_and_never_higher_ones() {
        let mut low = m("low", 10, 900);
        low.priority = -1;
        let mut high = m("high", 10, 1);
        high.priority = 5;
        let fleet = [n("a", 0, vec![high.clone(), low.clone(), m("mid", 10, 2)])];
        assert_eq!(
            plan_load(&fleet, &ask(10), Strategy::Priority),
            Plan::EvictThenLoad {
                neuron: "a".into(),
                evict: vec!["low".into()]
            }
        );
        assert!(matches!(
            plan_load(&fleet, &ask(30), Strategy::Priority),
            Plan::NoRoom { .. }
        ));
        // LRU would take the high-priority model, the least recently used.
        assert_eq!(
            plan_load(&fleet, &ask(10), Strategy::Lru),
            Plan::EvictThenLoad {
                neuron: "a".into(),
                evict: vec!["high".into()]
            }
        );
    }

    #[test]
    fn the_neuron_needing_fewest_evictions_is_chosen() {
        let fleet = [
            n("a", 0, vec![m("a1", 5, 1), m("a2", 5, 2)]),
            n("b", 0, vec![m("b1", 10, 3)]),
        ];
        assert_eq!(
            plan_load(&fleet, &ask(10), Strategy::Lru),
            Plan::EvictThenLoad {
                neuron: "b".into(),
                evict: vec!["b1".into()]
            }
        );
    }

    #[test]
    fn defrag_empties_the_least_used_neuron_onto_the_others() {
        let fleet = [
            n("a", 100, vec![m("a1", 50, 1)]),
            n("b", 30, vec![m("b1", 20, 1), m("b2", 10, 1)]),
            n("empty", 500, vec![]),
        ];
        let mut moves = plan_defrag(&fleet);
        moves.sort_by(|x, y| x.model.cmp(&y.model));
        assert_eq!(
            moves,
            vec![
                Move {
                    model: "b1".into(),
                    from: "b".into(),
                    to: "a".into()
                },
                Move {
                    model: "b2".into(),
                    from: "b".into(),
                    to: "a".into()
                },
            ]
        );
    }

    #[test]
    fn defrag_leaves_busy_models_and_neurons_that_cannot_be_emptied() {
        let mut busy = m("b1", 10, 1);
        busy.inflight = 2;
        // b cannot move (in flight); a does not fit into b.
        let fleet = [n("a", 5, vec![m("a1", 60, 1)]), n("b", 50, vec![busy])];
        assert_eq!(plan_defrag(&fleet), vec![]);
        // One neuron alone has nowhere to go; a model already on the target is not doubled.
        assert_eq!(plan_defrag(&[n("a", 5, vec![m("x", 1, 1)])]), vec![]);
        let fleet = [
            n("a", 100, vec![m("x", 10, 1)]),
            n("b", 100, vec![m("x", 10, 1), m("y", 50, 1)]),
        ];
        assert_eq!(plan_defrag(&fleet), vec![]);
    }

    #[test]
    fn unknown_size_goes_to_the_most_free_neuron() {
        let fleet = [n("a", 1, vec![]), n("b", 2, vec![])];
        let mut a = ask(0);
        a.bytes = None;
        assert_eq!(
            plan_load(&fleet, &a, Strategy::Lru),
            Plan::Load { neuron: "b".into() }
        );
    }
}
