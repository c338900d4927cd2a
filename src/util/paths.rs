//! Paths taken from files a user or an earlier run wrote: checked before they are joined.

use crate::util::io::resolved_path;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// A name read from a file (an objective's name, a block's directory) used as one path
/// component: letters, digits, `_`, `-` and `.`, not starting with a dot.
pub fn safe_component(name: &str, what: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !ok {
        bail!("{what} `{name}`: a name becomes a file or directory name here, so it may hold only letters, digits, `_`, `-` and `.`, and not start with `.`");
    }
    Ok(())
}

/// `recorded` (a path a run's own file names) resolved inside `run_dir`: relative, without
/// `..`, and still inside once symlinks are followed.
pub fn inside(run_dir: &Path, recorded: &str, what: &str) -> Result<PathBuf> {
    let rel = Path::new(recorded);
    let escapes = rel.is_absolute()
        || rel.components().any(|c| {
            !matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        });
    let joined = run_dir.join(rel);
    if escapes || !resolved_path(&joined).starts_with(resolved_path(run_dir)) {
        bail!(
            "{what}: `{recorded}` is not a path inside {}",
            run_dir.display()
        );
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_files_stay_one_component_and_recorded_paths_stay_inside() {
        for bad in ["../../x", "a/b", ".hidden", "", "x y"] {
            assert!(safe_component(bad, "objective name").is_err(), "{bad}");
        }
        safe_component("instruction_following-2.v1", "objective name").unwrap();
        let run = Path::new("/tmp/run");
        assert!(inside(run, "../elsewhere", "block").is_err());
        assert!(inside(run, "/etc", "block").is_err());
        assert_eq!(
            inside(run, "blocks/a", "block").unwrap(),
            run.join("blocks/a")
        );
    }
}
