//! `--layers`: which layers to probe.

use pyleak_common::{Layer, NUM_LAYERS};

use crate::errors::UserError;

/// A set of layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSet(u32);

impl LayerSet {
    /// Every layer.
    pub const ALL: LayerSet = LayerSet((1 << NUM_LAYERS) - 1);

    /// Whether `layer` is in the set.
    pub fn contains(self, layer: Layer) -> bool {
        self.0 & (1 << layer as u32) != 0
    }

    /// Parses `pymalloc,libc`, `all`...
    pub fn parse(s: &str) -> Result<LayerSet, UserError> {
        let mut bits = 0;
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "all" {
                bits |= LayerSet::ALL.0;
                continue;
            }
            let layer = Layer::named(name).ok_or_else(|| UserError::BadLayer(name.to_owned()))?;
            bits |= 1 << layer as u32;
        }
        if bits == 0 {
            return Err(UserError::BadLayer(s.to_owned()));
        }
        Ok(LayerSet(bits))
    }

    /// The layers in the set, top to bottom.
    pub fn iter(self) -> impl Iterator<Item = Layer> {
        Layer::ALL.into_iter().filter(move |l| self.contains(*l))
    }

    /// Comma-separated names.
    pub fn names(self) -> String {
        self.iter().map(Layer::name).collect::<Vec<_>>().join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_all() {
        let s = LayerSet::parse("libc, vm").unwrap();
        assert!(s.contains(Layer::Libc) && s.contains(Layer::Vm) && !s.contains(Layer::Pages));
        assert_eq!(LayerSet::parse("all").unwrap(), LayerSet::ALL);
        assert_eq!(s.names(), "libc,vm");
        assert!(matches!(LayerSet::parse("heap"), Err(UserError::BadLayer(n)) if n == "heap"));
        assert!(LayerSet::parse("").is_err());
    }
}
