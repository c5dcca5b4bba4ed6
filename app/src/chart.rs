//! Small SVG charts: line charts (points scaled into a box, with the axis extremes written out)
//! and histograms with an optional limit line.

use leptos::prelude::*;

pub const WIDTH: f64 = 320.0;
pub const HEIGHT: f64 = 120.0;
const LEFT: f64 = 46.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 8.0;
const BOTTOM: f64 = 18.0;

/// Formats an axis value compactly (`1e-5`, `0.25`, `12`).
pub fn short(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if x.abs() < 1e-2 || x.abs() >= 1e5 {
        format!("{x:.1e}")
    } else if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// The drawing box: data bounds mapped to SVG coordinates.
#[derive(Clone, Copy, PartialEq)]
pub struct Frame {
    pub x0: f64,
    pub x1: f64,
    pub y0: f64,
    pub y1: f64,
}

impl Frame {
    pub fn fit(series: &[&[(f64, f64)]], y_from_zero: bool) -> Frame {
        let all = series.iter().flat_map(|s| s.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in all {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            return Frame {
                x0: 0.0,
                x1: 1.0,
                y0: 0.0,
                y1: 1.0,
            };
        }
        if y_from_zero {
            y0 = y0.min(0.0);
        }
        if (x1 - x0).abs() < f64::EPSILON {
            x1 = x0 + 1.0;
        }
        if (y1 - y0).abs() < f64::EPSILON * y1.abs().max(1e-30) {
            y1 = y0 + y0.abs().max(1e-12);
        }
        Frame { x0, x1, y0, y1 }
    }

    pub fn x(&self, x: f64) -> f64 {
        LEFT + (x - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)
    }

    pub fn y(&self, y: f64) -> f64 {
        TOP + (1.0 - (y - self.y0) / (self.y1 - self.y0)) * (HEIGHT - TOP - BOTTOM)
    }

    pub fn polyline(&self, points: &[(f64, f64)]) -> String {
        points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", self.x(x), self.y(y)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The plot's background and its axis bounds, for a chart's frame.
fn axes(frame: impl Fn() -> Frame + Copy + Send + Sync + 'static) -> impl IntoView {
    view! {
        <rect class="plot-bg" x=LEFT y=TOP width=WIDTH - LEFT - RIGHT height=HEIGHT - TOP - BOTTOM />
        <text class="axis" x=LEFT - 4.0 y=TOP + 8.0 text-anchor="end">{move || short(frame().y1)}</text>
        <text class="axis" x=LEFT - 4.0 y=HEIGHT - BOTTOM text-anchor="end">{move || short(frame().y0)}</text>
        <text class="axis" x=LEFT y=HEIGHT - 4.0>{move || short(frame().x0)}</text>
        <text class="axis" x=WIDTH - RIGHT y=HEIGHT - 4.0 text-anchor="end">{move || short(frame().x1)}</text>
    }
}

/// A line chart of one or two series (`main`, and `extra` drawn dashed with dots, e.g. eval loss).
#[component]
pub fn LineChart(
    id: &'static str,
    #[prop(into)] title: Signal<String>,
    #[prop(into)] main: Signal<Vec<(f64, f64)>>,
    #[prop(optional, into)] extra: Option<Signal<Vec<(f64, f64)>>>,
    /// Start the y axis at zero (learning rates, accuracies).
    #[prop(optional)]
    from_zero: bool,
) -> impl IntoView {
    let extra = extra.unwrap_or_else(|| Signal::stored(Vec::new()));
    let frame = Memo::new(move |_| {
        let (main, extra) = (main.get(), extra.get());
        Frame::fit(&[&main, &extra], from_zero)
    });
    let frame = move || frame.get();
    view! {
        <figure class="chart">
            <figcaption>{move || title.get()}</figcaption>
            <svg
                id=id
                viewBox=format!("0 0 {WIDTH} {HEIGHT}")
                data-points=move || main.with(Vec::len).to_string()
                role="img"
            >
                {axes(frame)}
                <polyline class="line" points=move || main.with(|p| frame().polyline(p)) />
                <polyline class="line extra" points=move || extra.with(|p| frame().polyline(p)) />
                {move || {
                    let f = frame();
                    extra
                        .get()
                        .into_iter()
                        .map(|(x, y)| view! { <circle class="dot extra" cx=f.x(x) cy=f.y(y) r=2.5 /> })
                        .collect_view()
                }}
                {move || {
                    let f = frame();
                    let points = main.get();
                    // A lone point draws no line: mark it.
                    (points.len() == 1).then(|| {
                        let (x, y) = points[0];
                        view! { <circle class="dot" cx=f.x(x) cy=f.y(y) r=2.5 /> }
                    })
                }}
            </svg>
        </figure>
    }
}

/// The colours of overlaid series, in order (a run's colour is the same on every chart).
pub const PALETTE: [&str; 8] = [
    "#2f6fdd", "#d9480f", "#2b8a3e", "#9c36b5", "#e67700", "#0b7285", "#c2255c", "#5c940d",
];

pub fn colour(index: usize) -> &'static str {
    PALETTE[index % PALETTE.len()]
}

/// One line of a chart that overlays several (one run of a comparison).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Its place in the comparison, which picks its colour.
    pub index: usize,
    pub points: Vec<(f64, f64)>,
}

/// A line chart of several series, each in its colour; `data-series` is how many have points.
#[component]
pub fn MultiChart(
    id: &'static str,
    #[prop(into)] title: Signal<String>,
    #[prop(into)] series: Signal<Vec<Series>>,
    #[prop(optional)] from_zero: bool,
) -> impl IntoView {
    let drawn = Memo::new(move |_| {
        series
            .get()
            .into_iter()
            .filter(|s| !s.points.is_empty())
            .collect::<Vec<_>>()
    });
    let frame = Memo::new(move |_| {
        let drawn = drawn.get();
        let all: Vec<&[(f64, f64)]> = drawn.iter().map(|s| s.points.as_slice()).collect();
        Frame::fit(&all, from_zero)
    });
    let frame = move || frame.get();
    view! {
        <figure class="chart">
            <figcaption>{move || title.get()}</figcaption>
            <svg
                id=id
                viewBox=format!("0 0 {WIDTH} {HEIGHT}")
                data-series=move || drawn.with(Vec::len).to_string()
                role="img"
            >
                {axes(frame)}
                {move || {
                    let f = frame();
                    drawn
                        .get()
                        .into_iter()
                        .map(|s| {
                            let style = format!("stroke: {}; fill: {}", colour(s.index), colour(s.index));
                            // A lone point draws no line: mark it.
                            let dot = (s.points.len() == 1).then(|| {
                                let (x, y) = s.points[0];
                                view! { <circle class="dot" cx=f.x(x) cy=f.y(y) r=2.5 style=style.clone() /> }
                            });
                            view! {
                                <polyline
                                    class="line series"
                                    data-run=s.index
                                    style=format!("stroke: {}", colour(s.index))
                                    points=f.polyline(&s.points)
                                />
                                {dot}
                            }
                        })
                        .collect_view()
                }}
            </svg>
        </figure>
    }
}

/// One bar of a histogram: the values `from <= x < to`, how many there are, and its tooltip.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub from: f64,
    pub to: f64,
    pub count: f64,
    pub tip: String,
}

/// A vertical line across a histogram (a limit), with its label; bars that lie wholly past it
/// are drawn `over`, a bar it crosses `straddle`.
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    pub x: f64,
    pub label: String,
}

/// A bar chart of equal or unequal bins from `bars[0].from` to the last bar's `to`. The `<svg>`
/// is the whole view, so a caller's attributes (`{..} id=… data-…=…`) land on it.
#[component]
pub fn Histogram(
    #[prop(into)] bars: Signal<Vec<Bar>>,
    #[prop(optional, into)] marker: Option<Signal<Option<Marker>>>,
) -> impl IntoView {
    let marker = marker.unwrap_or_else(|| Signal::stored(None));
    let frame = move || {
        bars.with(|bars| {
            let x0 = bars.first().map_or(0.0, |b| b.from);
            let x1 = bars.last().map_or(1.0, |b| b.to);
            let x1 = marker.with(|m| m.as_ref().map_or(x1, |m| x1.max(m.x)));
            let y1 = bars.iter().map(|b| b.count).fold(0.0, f64::max);
            Frame {
                x0,
                x1: if x1 > x0 { x1 } else { x0 + 1.0 },
                y0: 0.0,
                y1: if y1 > 0.0 { y1 } else { 1.0 },
            }
        })
    };
    let rects = move || {
        let f = frame();
        let limit = marker.with(|m| m.as_ref().map(|m| m.x));
        bars.get()
            .into_iter()
            .map(|bar| {
                let class = match limit {
                    Some(x) if bar.from >= x => "bar over",
                    Some(x) if bar.to > x => "bar straddle",
                    _ => "bar",
                };
                let (left, right) = (f.x(bar.from), f.x(bar.to));
                let (top, bottom) = (f.y(bar.count), f.y(0.0));
                view! {
                    <rect
                        class=class
                        x=format!("{:.2}", left + 0.5)
                        y=format!("{top:.2}")
                        width=format!("{:.2}", (right - left - 1.0).max(0.5))
                        height=format!("{:.2}", bottom - top)
                    >
                        <title>{bar.tip}</title>
                    </rect>
                }
            })
            .collect_view()
    };
    let limit = move || {
        let f = frame();
        marker.get().map(|m| {
            let x = f.x(m.x);
            // The label on the side of the line with room for it.
            let anchor = if x > WIDTH * 0.7 { "end" } else { "start" };
            let dx = if anchor == "end" { -3.0 } else { 3.0 };
            view! {
                <line class="max-length" x1=x x2=x y1=f.y(f.y1) y2=f.y(0.0) />
                <text class="axis marker" x=x + dx y=f.y(f.y1) + 8.0 text-anchor=anchor>{m.label}</text>
            }
        })
    };
    view! {
        <svg viewBox=format!("0 0 {WIDTH} {HEIGHT}") class="histogram" role="img">
            <rect class="plot-bg" x=LEFT y=TOP width=WIDTH - LEFT - RIGHT height=HEIGHT - TOP - BOTTOM />
            <text class="axis" x=LEFT - 4.0 y=TOP + 8.0 text-anchor="end">{move || short(frame().y1)}</text>
            <text class="axis" x=LEFT - 4.0 y=HEIGHT - BOTTOM text-anchor="end">"0"</text>
            <text class="axis" x=LEFT y=HEIGHT - 4.0>{move || short(frame().x0)}</text>
            <text class="axis" x=WIDTH - RIGHT y=HEIGHT - 4.0 text-anchor="end">{move || short(frame().x1)}</text>
            {rects}
            {limit}
        </svg>
    }
}
