//! Line-protocol helpers on top of the `influxdb-line-protocol` crate: counting and
//! validating points of a body without re-encoding it.

/// The lines of a line-protocol body that InfluxDB 1.x takes as points
/// (`models.ParsePoints`): a line is skipped when it holds only spaces, tabs and NULs or
/// when its first other character is `#`; every other line is a point (valid or not).
/// Lines are split by the crate's splitter, a port of InfluxDB's `scanLine`: quoted
/// strings may hold newlines, and a backslash escapes a newline, also at the end of a
/// comment (which then swallows the next line, as in InfluxDB).
pub fn point_lines(body: &str) -> impl Iterator<Item = &str> {
    influxdb_line_protocol::split_lines(body).filter(|l| {
        let t = l.trim_start_matches([' ', '\t', '\0']);
        !t.is_empty() && !t.starts_with('#')
    })
}

/// Number of points in a line-protocol body, counted as InfluxDB splits it (see
/// [`point_lines`]).
pub fn count_points(body: &str) -> usize {
    point_lines(body).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_points_skips_blank_lines_and_comments_and_keeps_quoted_newlines() {
        let body = "m,t=a v=1i 1\n\n# comment\nm s=\"two\nlines\" 2\nm b=true 3\n";
        assert_eq!(count_points(body), 3);
    }

    #[test]
    fn only_spaces_tabs_and_nuls_lead_a_comment_or_blank_line_as_in_influxdb() {
        assert_eq!(count_points(" \t\0# comment\n\t \n\0\n"), 0);
        // InfluxDB skips nothing else: these lines are points (a measurement "\r#m", a
        // vertical tab) and the key parser sees them too.
        assert_eq!(count_points("\r#m v=1 1\n\u{b}m v=1 1\n"), 2);
    }
}
