//! Folded stacks (`frame;frame;... count` a line, Brendan Gregg's format)
//! and their SVG flame graph (the inferno crate), written atomically.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Sample counts by folded stack.
pub type Stacks = HashMap<String, u64>;

/// The folded lines of `stacks`, sorted (deterministic output).
pub fn folded(stacks: &Stacks) -> String {
    let mut lines: Vec<(&String, &u64)> = stacks.iter().collect();
    lines.sort();
    let mut out = String::with_capacity(lines.iter().map(|(s, _)| s.len() + 12).sum());
    for (stack, count) in lines {
        out.push_str(stack);
        out.push(' ');
        out.push_str(&count.to_string());
        out.push('\n');
    }
    out
}

/// Escapes the few characters XML text cannot hold as they are.
fn xml_text(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The flame graph of `folded` (as [`folded`] writes it), titled `title`
/// with `subtitle` below; an image saying so when there is no sample.
pub fn svg(folded: &str, title: &str, subtitle: &str) -> std::io::Result<Vec<u8>> {
    if folded.trim().is_empty() {
        return Ok(format!(
            concat!(
                "<?xml version=\"1.0\" standalone=\"no\"?>\n",
                "<svg version=\"1.1\" width=\"1200\" height=\"80\" xmlns=\"http://www.w3.org/2000/svg\">\n",
                "<text x=\"600\" y=\"24\" text-anchor=\"middle\" font-family=\"Verdana\" font-size=\"17\">{}</text>\n",
                "<text x=\"600\" y=\"56\" text-anchor=\"middle\" font-family=\"Verdana\" font-size=\"12\">no samples ({})</text>\n",
                "</svg>\n"
            ),
            xml_text(title),
            xml_text(subtitle)
        )
        .into_bytes());
    }
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_string();
    options.subtitle = Some(subtitle.to_string());
    options.count_name = "samples".into();
    // Colours by function name, the same in every graph.
    options.hash = true;
    options.deterministic = true;
    let mut out = Vec::new();
    inferno::flamegraph::from_lines(&mut options, folded.lines(), &mut out)?;
    Ok(out)
}

/// Writes `bytes` to `path` through a temporary file in the same directory
/// and a rename: a reader never sees a partly written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = path.with_file_name(format!(".{name}.tmp"));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_lines_are_sorted_and_counted() {
        let mut s = Stacks::new();
        s.insert("b;x".into(), 3);
        s.insert("a;y;z".into(), 10);
        assert_eq!(folded(&s), "a;y;z 10\nb;x 3\n");
        assert_eq!(folded(&Stacks::new()), "");
    }

    #[test]
    fn svg_is_a_flame_graph_or_says_there_is_nothing() {
        let out = svg("init;start_kernel;spin 5\nsh;[user] 2\n", "t <1>", "s").unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("<svg"), "{text}");
        assert!(text.contains("start_kernel"));
        assert!(text.trim_end().ends_with("</svg>"));
        let empty = String::from_utf8(svg("", "t <1>", "x & y").unwrap()).unwrap();
        assert!(empty.contains("<svg") && empty.contains("no samples (x &amp; y)"));
        assert!(empty.contains("t &lt;1&gt;"));
    }
}
