//! The set of runnable macros: nesting is checked once here (cycles, unknown macros, depth), so
//! the runner can expand nested macros without checking again.

use super::{MacroDef, MacroError, StepKind};
use std::collections::BTreeMap;

/// Most levels of macros nested under the started one.
pub const MAX_NESTING: usize = 8;

#[derive(Clone, Debug, Default)]
pub struct MacroCatalog {
    defs: BTreeMap<String, MacroDef>,
    refused: BTreeMap<String, MacroError>,
}

/// An error and whether it belongs to the macro itself (memoizable) or only to the path that
/// led to it (too deep from where we came).
type Walk = Result<Vec<String>, (MacroError, bool)>;

impl MacroCatalog {
    /// Keeps the good macros; refuses (and returns) those defined twice, nesting unknown or
    /// refused macros, in a cycle, or nesting deeper than [`MAX_NESTING`].
    pub fn new(defs: Vec<MacroDef>) -> (MacroCatalog, Vec<(String, MacroError)>) {
        let mut all: BTreeMap<String, MacroDef> = BTreeMap::new();
        let mut refused: BTreeMap<String, MacroError> = BTreeMap::new();
        for d in defs {
            if all.contains_key(&d.id) || refused.contains_key(&d.id) {
                all.remove(&d.id);
                refused.insert(d.id.clone(), MacroError::Duplicate(d.id));
            } else {
                all.insert(d.id.clone(), d);
            }
        }
        let mut memo: BTreeMap<String, Result<Vec<String>, MacroError>> = BTreeMap::new();
        let ids: Vec<String> = all.keys().cloned().collect();
        for id in &ids {
            let mut stack = Vec::new();
            if let Err((e, _)) = walk(id, &all, &refused, &mut stack, &mut memo) {
                refused.insert(id.clone(), e);
            }
        }
        for id in refused.keys() {
            all.remove(id);
        }
        let report = refused
            .iter()
            .map(|(id, e)| (id.clone(), e.clone()))
            .collect();
        (MacroCatalog { defs: all, refused }, report)
    }

    pub fn get(&self, id: &str) -> Option<&MacroDef> {
        self.defs.get(id)
    }

    /// Why a macro was left out, if it was.
    pub fn refused(&self, id: &str) -> Option<&MacroError> {
        self.refused.get(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.defs.keys().map(String::as_str)
    }
}

/// The longest nesting chain from `id` (itself first), or why `id` is refused.
fn walk(
    id: &str,
    defs: &BTreeMap<String, MacroDef>,
    refused: &BTreeMap<String, MacroError>,
    stack: &mut Vec<String>,
    memo: &mut BTreeMap<String, Result<Vec<String>, MacroError>>,
) -> Walk {
    if let Some(r) = memo.get(id) {
        return r.clone().map_err(|e| (e, true));
    }
    if let Some(e) = refused.get(id) {
        return Err((e.clone(), true));
    }
    let Some(def) = defs.get(id) else {
        return Err((MacroError::Unknown(id.to_string()), true));
    };
    // Bounds the recursion whatever the input; the path so far is already too deep.
    if stack.len() > MAX_NESTING {
        let mut path = stack.clone();
        path.push(id.to_string());
        return Err((MacroError::TooDeep { path }, false));
    }
    stack.push(id.to_string());
    let r = walk_steps(id, def, defs, refused, stack, memo);
    stack.pop();
    match &r {
        Err((_, false)) => {}
        _ => {
            memo.insert(id.to_string(), r.clone().map_err(|(e, _)| e));
        }
    }
    r
}

fn walk_steps(
    id: &str,
    def: &MacroDef,
    defs: &BTreeMap<String, MacroDef>,
    refused: &BTreeMap<String, MacroError>,
    stack: &mut Vec<String>,
    memo: &mut BTreeMap<String, Result<Vec<String>, MacroError>>,
) -> Walk {
    let mut longest = vec![id.to_string()];
    for step in &def.steps {
        let StepKind::Macro { macro_id: nested } = &step.kind else {
            continue;
        };
        if let Some(pos) = stack.iter().position(|s| s == nested) {
            let mut path = stack[pos..].to_vec();
            path.push(nested.clone());
            return Err((MacroError::Cycle { path }, true));
        }
        if !defs.contains_key(nested) && !refused.contains_key(nested) {
            return Err((
                MacroError::UnknownNested {
                    sequence: step.sequence,
                    nested: nested.clone(),
                },
                true,
            ));
        }
        match walk(nested, defs, refused, stack, memo) {
            Ok(chain) => {
                if chain.len() + 1 > longest.len() {
                    longest = std::iter::once(id.to_string()).chain(chain).collect();
                }
            }
            Err((e, own)) => {
                let e = match e {
                    // Part of the cycle itself, or the path-dependent depth: report as is.
                    MacroError::Cycle { path } if path.iter().any(|p| p == id) => {
                        MacroError::Cycle { path }
                    }
                    e @ MacroError::TooDeep { .. } if !own => e,
                    e => MacroError::NestedRefused {
                        nested: nested.clone(),
                        reason: e.to_string(),
                    },
                };
                return Err((e, own));
            }
        }
    }
    if longest.len() > MAX_NESTING + 1 {
        return Err((MacroError::TooDeep { path: longest }, true));
    }
    Ok(longest)
}
