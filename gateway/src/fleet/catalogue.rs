//! The placements the gateway serves, by served name and alias.

use std::collections::HashMap;

use cortex_core::placement::PlacementSpec;
use serde::Deserialize;

/// A placement: a name (the model's id on the neurons) plus the ModelPlacement spec fields; one
/// `[[placements]]` table of `models.toml`, or a ModelPlacement in Kubernetes mode.
#[derive(Debug, Clone, Deserialize)]
pub struct Placement {
    pub name: String,
    #[serde(flatten)]
    pub spec: PlacementSpec,
}

impl Placement {
    pub fn served_name(&self) -> &str {
        self.spec.served_name.as_deref().unwrap_or(&self.name)
    }

    /// Every name clients may send for it: the served name, then the aliases.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.served_name()).chain(self.spec.aliases.iter().map(String::as_str))
    }
}

/// The placements served, by served name and alias.
#[derive(Default)]
pub struct Catalogue {
    pub placements: Vec<Placement>,
    names: HashMap<String, usize>,
}

impl Catalogue {
    /// The catalogue of `placements`, and the names more than one of them asks for: such a name
    /// goes to the first that asks.
    pub fn new(placements: Vec<Placement>) -> (Catalogue, Vec<String>) {
        let mut names = HashMap::new();
        let mut shadowed = Vec::new();
        for (i, p) in placements.iter().enumerate() {
            for name in p.names() {
                if names.contains_key(name) {
                    shadowed.push(name.to_string());
                } else {
                    names.insert(name.to_string(), i);
                }
            }
        }
        (Catalogue { placements, names }, shadowed)
    }

    /// The placement serving a name or alias.
    pub fn get(&self, name: &str) -> Option<&Placement> {
        self.names.get(name).map(|&i| &self.placements[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(name: &str, aliases: &[&str]) -> Placement {
        serde_json::from_value(serde_json::json!({
            "name": name, "aliases": aliases, "model": {"uri": "file:///m.gguf"}
        }))
        .unwrap()
    }

    #[test]
    fn a_name_two_placements_ask_for_goes_to_the_first_and_is_reported() {
        let (c, shadowed) =
            Catalogue::new(vec![placement("a", &["x"]), placement("b", &["x", "y"])]);
        assert_eq!(c.get("x").unwrap().name, "a");
        assert_eq!(c.get("y").unwrap().name, "b");
        assert!(c.get("z").is_none());
        assert_eq!(shadowed, vec!["x".to_string()]);
    }
}
