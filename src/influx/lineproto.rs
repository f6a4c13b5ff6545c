//! Line-protocol helpers on top of the `influxdb-line-protocol` crate: counting and
//! validating points of a body without re-encoding it.

/// Number of points in a line-protocol body (comments and blank lines skipped).
/// Quoted strings holding newlines are handled by the crate's splitter.
pub fn count_points(body: &str) -> usize {
    influxdb_line_protocol::split_lines(body)
        .filter(|l| {
            let t = l.trim_start();
            !t.is_empty() && !t.starts_with('#')
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_points_skips_blank_lines_and_comments_and_keeps_quoted_newlines() {
        let body = "m,t=a v=1i 1\n\n# comment\nm s=\"two\nlines\" 2\nm b=true 3\n";
        assert_eq!(count_points(body), 3);
    }
}
