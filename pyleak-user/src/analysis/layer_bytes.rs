//! Bytes per layer with one JSON field per layer, named by the registry
//! (`pyleak_common::LAYERS`, `LayerInfo::linkage`): how the report's linkage lists every
//! layer without naming any.

use std::ops::{Index, IndexMut};

use pyleak_common::{Layer, NUM_LAYERS};
use serde::{
    de::{IgnoredAny, MapAccess, Visitor},
    ser::SerializeMap,
    Deserialize, Deserializer, Serialize, Serializer,
};

/// Live bytes per layer, indexed by [`Layer`]. Serialized as a map of every layer's
/// `linkage` field (`pymalloc_live_bytes`, …, `resident_bytes`), meant to be
/// `#[serde(flatten)]`ed into the struct that holds it; a field missing when read is 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerBytes(pub [u64; NUM_LAYERS]);

impl Index<Layer> for LayerBytes {
    type Output = u64;
    fn index(&self, layer: Layer) -> &u64 {
        &self.0[layer as usize]
    }
}

impl IndexMut<Layer> for LayerBytes {
    fn index_mut(&mut self, layer: Layer) -> &mut u64 {
        &mut self.0[layer as usize]
    }
}

impl Serialize for LayerBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(NUM_LAYERS))?;
        for layer in Layer::ALL {
            map.serialize_entry(layer.info().linkage, &self[layer])?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for LayerBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = LayerBytes;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("live bytes per layer")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LayerBytes, A::Error> {
                let mut out = LayerBytes::default();
                while let Some(key) = map.next_key::<String>()? {
                    match Layer::ALL.into_iter().find(|l| l.info().linkage == key) {
                        Some(layer) => out[layer] = map.next_value()?,
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(Fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Holder {
        #[serde(flatten)]
        live: LayerBytes,
        other: u64,
    }

    #[test]
    fn every_layer_is_a_field_named_by_the_registry_and_reads_back() {
        let mut live = LayerBytes::default();
        live[Layer::Libc] = 7;
        live[Layer::Pages] = 9;
        let h = Holder { live, other: 3 };
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(
            json,
            r#"{"pymalloc_live_bytes":0,"pymem_raw_live_bytes":0,"libc_live_bytes":7,"vm_live_bytes":0,"resident_bytes":9,"other":3}"#
        );
        assert_eq!(serde_json::from_str::<Holder>(&json).unwrap(), h);
        // A field missing is 0; one not known is ignored.
        let old: Holder =
            serde_json::from_str(r#"{"libc_live_bytes":5,"x":[1],"other":1}"#).unwrap();
        assert_eq!(old.live[Layer::Libc], 5);
        assert_eq!(old.live[Layer::Pymalloc], 0);
    }
}
