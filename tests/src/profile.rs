//! Guest profiles as rtv writes them (`rtv --debug`, `$RTV_PROFILE_DIR`):
//! a pod's `parts.txt` and the flame graph of several parts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The parts of a pod's profile in `dir`, from its `parts.txt`: (n, label).
pub fn parts(dir: &Path) -> Result<Vec<(u32, String)>> {
    let index = dir.join("parts.txt");
    let text =
        std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            line.split_once('\t')
                .and_then(|(n, label)| Some((n.parse().ok()?, label.to_owned())))
                .with_context(|| format!("{}:{}: not `n<TAB>label`", index.display(), i + 1))
        })
        .collect()
}

/// The stacks of folded files (Brendan Gregg's format), added up.
pub fn add_folded(files: &[PathBuf]) -> Result<BTreeMap<String, u64>> {
    let mut stacks: BTreeMap<String, u64> = BTreeMap::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let (stack, count) = line
                .rsplit_once(' ')
                .and_then(|(s, c)| Some((s, c.parse::<u64>().ok()?)))
                .with_context(|| format!("{}:{}: not `stack count`", f.display(), i + 1))?;
            *stacks.entry(stack.to_owned()).or_default() += count;
        }
    }
    Ok(stacks)
}

/// Draws one flame graph (inferno) of the folded files' stacks added up,
/// to `out`; returns the number of samples.
pub fn flamegraph(out: &Path, title: &str, files: &[PathBuf]) -> Result<u64> {
    let stacks = add_folded(files)?;
    let total: u64 = stacks.values().sum();
    anyhow::ensure!(total > 0, "no samples in {files:?}");
    let lines: Vec<String> = stacks.iter().map(|(s, c)| format!("{s} {c}")).collect();
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_owned();
    options.subtitle = Some(format!("{total} samples from {} part(s)", files.len()));
    options.count_name = "samples".into();
    options.hash = true;
    options.deterministic = true;
    let mut svg = Vec::new();
    inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), &mut svg)
        .context("drawing the flame graph")?;
    std::fs::write(out, svg).with_context(|| format!("writing {}", out.display()))?;
    Ok(total)
}
