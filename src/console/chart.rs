//! The namespaces view's chart: records created and completed per minute, as inline SVG drawn on
//! the server. No chart library and no script: it renders under the strict CSP (presentation
//! attributes, classes from the console's stylesheet) and in a browser with scripts off.

use maud::{html, Markup};

use crate::proto::idempotency::admin::v1 as admin;

const WIDTH: u64 = 600;
const HEIGHT: u64 = 120;
const LEFT: u64 = 40;
const BOTTOM: u64 = 18;

/// A line chart of `minutes` (oldest first), created and completed.
pub fn minutes(namespace: &str, minutes: &[admin::MinuteCounts]) -> Markup {
    let peak = minutes
        .iter()
        .map(|minute| minute.created.max(minute.completed))
        .max()
        .unwrap_or(0)
        .max(1);
    let created: Vec<u64> = minutes.iter().map(|minute| minute.created).collect();
    let completed: Vec<u64> = minutes.iter().map(|minute| minute.completed).collect();
    let total_created: u64 = created.iter().sum();
    let total_completed: u64 = completed.iter().sum();
    let plot_height = HEIGHT - BOTTOM;
    html! {
        figure.chart {
            svg viewBox=(format!("0 0 {} {}", WIDTH + LEFT, HEIGHT)) role="img"
                aria-label=(format!("{namespace}: {total_created} created, {total_completed} completed in the last hour")) {
                line.axis x1=(LEFT) y1=(plot_height) x2=(LEFT + WIDTH) y2=(plot_height) {}
                line.axis x1=(LEFT) y1="0" x2=(LEFT) y2=(plot_height) {}
                text.tick x=(LEFT - 4) y="10" text-anchor="end" { (peak) }
                text.tick x=(LEFT - 4) y=(plot_height) text-anchor="end" { "0" }
                text.tick x=(LEFT) y=(HEIGHT - 2) { (format!("-{} min", minutes.len().saturating_sub(1))) }
                text.tick x=(LEFT + WIDTH) y=(HEIGHT - 2) text-anchor="end" { "now" }
                polyline.created points=(points(&created, peak, plot_height)) {}
                polyline.completed points=(points(&completed, peak, plot_height)) {}
            }
            figcaption {
                span.legend-created { "created " (total_created) }
                " · "
                span.legend-completed { "completed " (total_completed) }
                " · per minute, last hour"
            }
        }
    }
}

fn points(values: &[u64], peak: u64, plot_height: u64) -> String {
    let steps = values.len().saturating_sub(1).max(1) as u64;
    values
        .iter()
        .enumerate()
        .map(|(index, value)| {
            let x = LEFT + (index as u64) * WIDTH / steps;
            let y = plot_height - value.min(&peak) * (plot_height - 4) / peak;
            format!("{x},{y}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_scale_to_the_peak() {
        assert_eq!(points(&[0, 5, 10], 10, 102), "40,102 340,53 640,4");
        assert_eq!(points(&[], 1, 102), "");
    }

    #[test]
    fn the_namespace_is_escaped_in_the_label() {
        let chart = minutes("<b>", &[]).into_string();
        assert!(chart.contains("&lt;b&gt;"));
        assert!(!chart.contains("<b>"));
    }
}
