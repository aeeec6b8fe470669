//! Readable JSON comparisons: on mismatch, a line diff of the pretty-printed
//! documents instead of two walls of text.
use serde_json::Value;

/// A minimal LCS line diff (`-` only in left, `+` only in right, two spaces
/// of context shown as ` `). Inputs here are a few hundred lines at most.
pub fn line_diff(left: &str, right: &str) -> String {
    let a: Vec<&str> = left.lines().collect();
    let b: Vec<&str> = right.lines().collect();
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut lines: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            lines.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            lines.push(('+', b[j]));
            j += 1;
        } else {
            lines.push(('-', a[i]));
            i += 1;
        }
    }
    // Keep changed lines plus 3 lines of context around them.
    let changed: Vec<usize> = (0..lines.len()).filter(|&k| lines[k].0 != ' ').collect();
    let mut out = String::new();
    let mut last_printed: Option<usize> = None;
    for (k, (tag, line)) in lines.iter().enumerate() {
        let near = changed.iter().any(|&c| c.abs_diff(k) <= 3);
        if !near {
            continue;
        }
        if let Some(l) = last_printed {
            if k > l + 1 {
                out += "   ...\n";
            }
        }
        out += &format!("{tag} {line}\n");
        last_printed = Some(k);
    }
    out
}

/// Panics with a labelled diff unless `left == right`.
#[track_caller]
pub fn assert_json_eq(
    left_label: &str,
    left: &Value,
    right_label: &str,
    right: &Value,
    context: &str,
) {
    if left != right {
        let l = serde_json::to_string_pretty(left).unwrap_or_default();
        let r = serde_json::to_string_pretty(right).unwrap_or_default();
        panic!(
            "{context}: {left_label} and {right_label} differ (- {left_label}, + {right_label}):\n{}",
            line_diff(&l, &r)
        );
    }
}
