//! Results keyed by name (an objective, a judge), in the order they were computed, written as
//! one JSON object.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq)]
pub struct Keyed<T>(pub Vec<(String, T)>);

impl<T> Default for Keyed<T> {
    fn default() -> Self {
        Self(vec![])
    }
}

impl<T> Keyed<T> {
    pub fn get(&self, key: &str) -> Option<&T> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn push(&mut self, key: String, value: T) {
        self.0.push((key, value));
    }
}

impl<T: Serialize> Serialize for Keyed<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Keyed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through JSON's own map, which keeps the written order.
        let map = serde_json::Map::deserialize(d)?;
        map.into_iter()
            .map(|(k, v)| {
                Ok((
                    k,
                    serde_json::from_value(v).map_err(serde::de::Error::custom)?,
                ))
            })
            .collect::<Result<_, _>>()
            .map(Keyed)
    }
}
