//! The invariant `before + trace = after`, checked extent by extent.
//!
//! Two extent trees agree when they have the same set of bytenrs and, for
//! each extent, the same `num_bytes`, the same kind (data, or tree block
//! with the same level), the same `refs`, the same multiset of backrefs
//! with counts — whether stored inline or keyed — and, for tree blocks, the
//! same `FULL_BACKREF` flag. Generation, inline/keyed placement, the tree
//! key of non-skinny tree blocks and item order are not compared: the
//! kernel decides them with information a trace does not carry (see
//! `../shared/traces/README.md`).

use std::cmp::Ordering;
use std::fmt;

use refd_core::extent_tree::{ExtentItem, ExtentTree};
use refd_core::model::{ExtentKind, RefKey};

use crate::export::canonical_line;

/// One difference between the expected tree (e.g. `after.txt`) and the one
/// obtained (e.g. a replay).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// An extent that should exist does not.
    Missing {
        /// Extent.
        bytenr: u64,
        /// The expected extent in canonical form.
        expected: String,
    },
    /// An extent exists that should not.
    Extra {
        /// Extent.
        bytenr: u64,
        /// The extent obtained, in canonical form.
        got: String,
    },
    /// Different size.
    NumBytes {
        /// Extent.
        bytenr: u64,
        /// Expected size.
        expected: u64,
        /// Size obtained.
        got: u64,
    },
    /// Different kind or tree level.
    Kind {
        /// Extent.
        bytenr: u64,
        /// Expected kind.
        expected: ExtentKind,
        /// Kind obtained.
        got: ExtentKind,
    },
    /// Different total reference count.
    Refs {
        /// Extent.
        bytenr: u64,
        /// Expected refs.
        expected: u64,
        /// Refs obtained.
        got: u64,
    },
    /// Different `FULL_BACKREF` flag on a tree block.
    FullBackref {
        /// Extent.
        bytenr: u64,
        /// Expected flag.
        expected: bool,
        /// Flag obtained.
        got: bool,
    },
    /// Different count of one backref (0 = absent).
    Backref {
        /// Extent.
        bytenr: u64,
        /// The backref.
        key: RefKey,
        /// Expected count.
        expected: u64,
        /// Count obtained.
        got: u64,
    },
}

impl Mismatch {
    /// The extent this mismatch is about.
    pub fn bytenr(&self) -> u64 {
        match *self {
            Mismatch::Missing { bytenr, .. }
            | Mismatch::Extra { bytenr, .. }
            | Mismatch::NumBytes { bytenr, .. }
            | Mismatch::Kind { bytenr, .. }
            | Mismatch::Refs { bytenr, .. }
            | Mismatch::FullBackref { bytenr, .. }
            | Mismatch::Backref { bytenr, .. } => bytenr,
        }
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Missing { bytenr, expected } => {
                write!(f, "extent {bytenr}: missing; expected {expected}")
            }
            Mismatch::Extra { bytenr, got } => {
                write!(f, "extent {bytenr}: not expected; got {got}")
            }
            Mismatch::NumBytes {
                bytenr,
                expected,
                got,
            } => write!(
                f,
                "extent {bytenr}: num_bytes expected {expected}, got {got}"
            ),
            Mismatch::Kind {
                bytenr,
                expected,
                got,
            } => write!(f, "extent {bytenr}: expected {expected}, got {got}"),
            Mismatch::Refs {
                bytenr,
                expected,
                got,
            } => write!(f, "extent {bytenr}: refs expected {expected}, got {got}"),
            Mismatch::FullBackref {
                bytenr,
                expected,
                got,
            } => write!(
                f,
                "extent {bytenr}: FULL_BACKREF expected {}, got {}",
                if *expected { "set" } else { "clear" },
                if *got { "set" } else { "clear" }
            ),
            Mismatch::Backref {
                bytenr,
                key,
                expected,
                got,
            } => write!(
                f,
                "extent {bytenr}: backref '{key}' count expected {expected}, got {got}"
            ),
        }
    }
}

/// Compare one extent present in both trees.
fn compare_item(bytenr: u64, e: &ExtentItem, g: &ExtentItem, out: &mut Vec<Mismatch>) {
    if e.num_bytes != g.num_bytes {
        out.push(Mismatch::NumBytes {
            bytenr,
            expected: e.num_bytes,
            got: g.num_bytes,
        });
    }
    if e.kind != g.kind {
        out.push(Mismatch::Kind {
            bytenr,
            expected: e.kind,
            got: g.kind,
        });
    } else if !e.kind.is_data() && e.full_backref() != g.full_backref() {
        out.push(Mismatch::FullBackref {
            bytenr,
            expected: e.full_backref(),
            got: g.full_backref(),
        });
    }
    if e.refs != g.refs {
        out.push(Mismatch::Refs {
            bytenr,
            expected: e.refs,
            got: g.refs,
        });
    }
    // Merge the two sorted backref lists.
    let (eb, gb) = (e.backrefs(), g.backrefs());
    let (mut i, mut j) = (0, 0);
    while i < eb.len() || j < gb.len() {
        let order = match (eb.get(i), gb.get(j)) {
            (Some(a), Some(b)) => a.0.cmp(&b.0),
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        let (key, expected, got) = match order {
            Ordering::Less => {
                i += 1;
                (eb[i - 1].0, eb[i - 1].1, 0)
            }
            Ordering::Greater => {
                j += 1;
                (gb[j - 1].0, 0, gb[j - 1].1)
            }
            Ordering::Equal => {
                i += 1;
                j += 1;
                (eb[i - 1].0, eb[i - 1].1, gb[j - 1].1)
            }
        };
        if expected != got {
            out.push(Mismatch::Backref {
                bytenr,
                key,
                expected,
                got,
            });
        }
    }
}

/// Every difference between `expected` and `got`, in bytenr order. Empty
/// exactly when the invariant holds.
pub fn compare(expected: &ExtentTree, got: &ExtentTree) -> Vec<Mismatch> {
    let mut out = Vec::new();
    let mut ei = expected.iter().peekable();
    let mut gi = got.iter().peekable();
    loop {
        let order = match (ei.peek(), gi.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((a, _)), Some((b, _))) => a.cmp(b),
        };
        match order {
            Ordering::Less => {
                if let Some((bytenr, item)) = ei.next() {
                    out.push(Mismatch::Missing {
                        bytenr,
                        expected: canonical_line(bytenr, item),
                    });
                }
            }
            Ordering::Greater => {
                if let Some((bytenr, item)) = gi.next() {
                    out.push(Mismatch::Extra {
                        bytenr,
                        got: canonical_line(bytenr, item),
                    });
                }
            }
            Ordering::Equal => {
                if let (Some((bytenr, e)), Some((_, g))) = (ei.next(), gi.next()) {
                    compare_item(bytenr, e, g, &mut out);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use refd_core::model::BLOCK_FLAG_FULL_BACKREF;

    fn data(refs: &[(RefKey, u64)]) -> ExtentItem {
        let mut item = ExtentItem::new(8192, ExtentKind::Data, 7);
        for &(k, c) in refs {
            item.add_ref(k, c as i64);
        }
        item
    }

    const EDR: RefKey = RefKey::ExtentData {
        root: 5,
        objectid: 257,
        offset: 0,
    };
    const SDR: RefKey = RefKey::SharedData { parent: 65536 };

    #[test]
    fn equal_trees_despite_placement_and_generation() {
        let mut a = ExtentTree::new();
        a.insert(4096, data(&[(EDR, 2), (SDR, 1)]));
        let mut b = ExtentTree::new();
        let mut item = data(&[(EDR, 2)]);
        item.keyed.push((SDR, 1));
        item.refs += 1;
        item.generation = 99;
        b.insert(4096, item);
        assert_eq!(compare(&a, &b), vec![]);
    }

    #[test]
    fn every_kind_of_difference_is_reported() {
        let mut a = ExtentTree::new();
        a.insert(4096, data(&[(EDR, 2)]));
        a.insert(1 << 20, data(&[(EDR, 1)]));
        let mut tb = ExtentItem::new(16384, ExtentKind::Tree { level: 1 }, 1);
        tb.add_ref(RefKey::TreeBlock { root: 5 }, 1);
        a.insert(1 << 21, tb.clone());
        let mut b = ExtentTree::new();
        let mut item = data(&[(EDR, 1), (SDR, 1)]);
        item.num_bytes = 4096;
        b.insert(4096, item);
        b.insert(3 << 20, data(&[(SDR, 1)]));
        let mut tb2 = tb.clone();
        tb2.flags |= BLOCK_FLAG_FULL_BACKREF;
        b.insert(1 << 21, tb2);
        let m = compare(&a, &b);
        assert_eq!(
            m,
            vec![
                Mismatch::NumBytes {
                    bytenr: 4096,
                    expected: 8192,
                    got: 4096
                },
                Mismatch::Backref {
                    bytenr: 4096,
                    key: EDR,
                    expected: 2,
                    got: 1
                },
                Mismatch::Backref {
                    bytenr: 4096,
                    key: SDR,
                    expected: 0,
                    got: 1
                },
                Mismatch::Missing {
                    bytenr: 1 << 20,
                    expected: "1048576 len=8192 data refs=1 ed(5,257,0)=1".into()
                },
                Mismatch::FullBackref {
                    bytenr: 1 << 21,
                    expected: false,
                    got: true
                },
                Mismatch::Extra {
                    bytenr: 3 << 20,
                    got: "3145728 len=8192 data refs=1 sd(65536)=1".into()
                },
            ]
        );
        assert_eq!(
            m[1].to_string(),
            "extent 4096: backref 'extent data backref root 5 objectid 257 offset 0' count expected 2, got 1"
        );
        assert_eq!(
            m[4].to_string(),
            "extent 2097152: FULL_BACKREF expected clear, got set"
        );
        assert!(m.iter().all(|x| !x.to_string().is_empty()));

        let mut c = a.clone();
        let mut tb3 = tb;
        tb3.kind = ExtentKind::Tree { level: 0 };
        c.insert(1 << 21, tb3);
        assert_eq!(
            compare(&a, &c),
            vec![Mismatch::Kind {
                bytenr: 1 << 21,
                expected: ExtentKind::Tree { level: 1 },
                got: ExtentKind::Tree { level: 0 }
            }]
        );
    }
}
