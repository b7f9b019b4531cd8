//! Stop strings that may straddle token boundaries: text that could be the start of a stop string
//! is held back until it either completes one (and is dropped with it) or cannot.

pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds generated text; returns the text that is safe to emit and the stop string if one
    /// completed (generation must then end; nothing after it is emitted).
    pub fn push(&mut self, piece: &str) -> (String, Option<String>) {
        self.pending.push_str(piece);
        if self.stops.is_empty() {
            return (std::mem::take(&mut self.pending), None);
        }
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|i| (i, s)))
            .min_by_key(|(i, s)| (*i, std::cmp::Reverse(s.len())));
        if let Some((i, s)) = hit {
            let s = s.clone();
            let out = self.pending[..i].to_string();
            self.pending.clear();
            return (out, Some(s));
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let keep_from = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let out = self.pending[..keep_from].to_string();
        self.pending.drain(..keep_from);
        (out, None)
    }

    /// The text held back when generation ends without a stop string.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (t, hit) = m.push(p);
            out.push_str(&t);
            if hit.is_some() {
                return (out, hit);
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn stop_string_split_across_tokens_is_found_and_not_returned() {
        assert_eq!(
            run(&["END"], &["Paris", " E", "N", "D and more"]),
            ("Paris ".to_string(), Some("END".to_string()))
        );
    }

    #[test]
    fn a_false_start_is_released() {
        assert_eq!(run(&["END"], &["EN", "TRY"]), ("ENTRY".to_string(), None));
    }

    #[test]
    fn earliest_stop_wins() {
        assert_eq!(
            run(&["b", "a"], &["xab"]),
            ("x".to_string(), Some("a".to_string()))
        );
    }

    #[test]
    fn multibyte_text_is_not_split() {
        assert_eq!(
            run(&["é!"], &["café", "!"]),
            ("caf".to_string(), Some("é!".to_string()))
        );
        assert_eq!(run(&["é!"], &["café", "?"]), ("café?".to_string(), None));
    }
}
