//! Percentiles and the min/median/max spread over repeats.
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

/// JSON has no NaN (serde_json writes it as null): reads null back as NaN,
/// so `--report-only` can load what a run wrote.
pub fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Nearest-rank percentile of unsorted samples (NaN when empty).
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

pub fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

pub fn mean(v: &[f64]) -> f64 {
    let s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.iter().sum::<f64>() / s.len() as f64
}

/// Least-squares slope of `ys` against their index (per step of x).
pub fn slope(ys: &[f64]) -> f64 {
    let n = ys.len() as f64;
    if ys.len() < 2 {
        return 0.0;
    }
    let mx = (n - 1.0) / 2.0;
    let my = mean(ys);
    let (mut num, mut den) = (0.0, 0.0);
    for (i, y) in ys.iter().enumerate() {
        let dx = i as f64 - mx;
        num += dx * (y - my);
        den += dx * dx;
    }
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// One figure measured once per repeat: its spread across repeats.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(v: &[f64]) -> Spread {
        let s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        Spread {
            min: s.iter().copied().fold(f64::NAN, f64::min),
            median: median(&s),
            max: s.iter().copied().fold(f64::NAN, f64::max),
            n: s.len(),
        }
    }

    pub fn is_valid(&self) -> bool {
        self.n > 0 && self.median.is_finite()
    }

    pub fn json(&self) -> Value {
        if !self.is_valid() {
            return Value::Null;
        }
        json!({ "min": r3(self.min), "median": r3(self.median), "max": r3(self.max), "n": self.n })
    }

    /// `median [min–max]` with `digits` decimals, or `n/a`.
    pub fn fmt(&self, digits: usize) -> String {
        if !self.is_valid() {
            return "n/a".into();
        }
        if self.n == 1 || (self.min == self.max) {
            return format!("{:.*}", digits, self.median);
        }
        format!(
            "{:.*} [{:.*}–{:.*}]",
            digits, self.median, digits, self.min, digits, self.max
        )
    }
}

/// Rounds to three significant decimals for the JSON.
pub fn r3(x: f64) -> f64 {
    if !x.is_finite() {
        return x;
    }
    (x * 1000.0).round() / 1000.0
}

/// `a / b` as text (`12.3×`), `n/a` when either is missing.
pub fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b != 0.0 {
        let r = a / b;
        if r >= 10.0 {
            format!("{r:.0}×")
        } else {
            format!("{r:.2}×")
        }
    } else {
        "n/a".into()
    }
}

pub fn ratio_value(a: f64, b: f64) -> Value {
    if a.is_finite() && b.is_finite() && b != 0.0 {
        json!(r3(a / b))
    } else {
        Value::Null
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 95.0), 95.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 95.0), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn spread_and_ratio() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.min, s.median, s.max, s.n), (1.0, 2.0, 3.0, 3));
        assert_eq!(s.fmt(1), "2.0 [1.0–3.0]");
        assert_eq!(Spread::of(&[]).fmt(1), "n/a");
        assert_eq!(ratio(50.0, 2.0), "25×");
        assert_eq!(ratio(1.0, 2.0), "0.50×");
        assert_eq!(ratio(1.0, f64::NAN), "n/a");
    }

    #[test]
    fn slope_of_a_line() {
        let ys: Vec<f64> = (0..10).map(|i| 2.0 * i as f64 + 1.0).collect();
        assert!((slope(&ys) - 2.0).abs() < 1e-9);
        assert_eq!(slope(&[1.0]), 0.0);
    }
}
