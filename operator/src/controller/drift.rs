//! Drift: whether a live child still carries every field the operator applied.
//!
//! The apiserver adds defaults (and other managers add their own fields), so the live object is a
//! superset of what was applied; only a field we set that now differs is drift. That is the same
//! test Kubernetes calls "semantic deep derivative": what the desired object leaves out is not
//! compared.

use serde_json::Value;

/// The first path where `live` no longer matches `want`, or `None` when every field of `want` is
/// present in `live` with an equal value.
///
/// A field of `want` that `live` lacks counts as equal when it holds a zero value (`false`, `0`,
/// `""`, empty list or map): Go types drop those on the wire. Resource quantities (under
/// `limits`/`requests`) compare by value, so `0.5` and `500m` are equal, as the apiserver
/// rewrites one into the other.
pub fn first_difference(live: &Value, want: &Value) -> Option<String> {
    diff(live, want, &mut String::new())
}

fn diff(live: &Value, want: &Value, path: &mut String) -> Option<String> {
    match (want, live) {
        (Value::Null, _) => None,
        (Value::Object(w), Value::Object(l)) => {
            for (k, wv) in w {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                let found = match l.get(k) {
                    None if is_zero(wv) => None,
                    None => Some(path.clone()),
                    Some(lv) => diff(lv, wv, path),
                };
                path.truncate(len);
                if found.is_some() {
                    return found;
                }
            }
            None
        }
        (Value::Array(w), Value::Array(l)) => {
            if w.len() != l.len() {
                return Some(format!("{path} (length {} instead of {})", l.len(), w.len()));
            }
            for (i, (wv, lv)) in w.iter().zip(l).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = diff(lv, wv, path);
                path.truncate(len);
                if found.is_some() {
                    return found;
                }
            }
            None
        }
        (Value::Number(w), Value::Number(l)) => (w.as_f64() != l.as_f64()).then(|| path.clone()),
        (Value::String(w), Value::String(l)) => {
            let in_resources = path.contains(".limits.") || path.contains(".requests.");
            let same = w == l
                || in_resources && matches!((quantity(w), quantity(l)), (Some(a), Some(b)) if close(a, b));
            (!same).then(|| path.clone())
        }
        (w, l) => (w != l).then(|| path.clone()),
    }
}

fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_zero),
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// A Kubernetes quantity (`500m`, `2Gi`, `1e3`, `1.5`) as a number; `None` if it is not one.
fn quantity(s: &str) -> Option<f64> {
    const BINARY: [(&str, f64); 6] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
    ];
    const DECIMAL: [(&str, f64); 9] = [
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let number = |n: &str| {
        let ok = !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit() || b".+-eE".contains(&c));
        ok.then(|| n.parse::<f64>().ok()).flatten()
    };
    for (suffix, scale) in BINARY.iter().chain(DECIMAL.iter()) {
        if let Some(n) = s.strip_suffix(suffix)
            && let Some(v) = number(n)
        {
            return Some(v * scale);
        }
    }
    number(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_and_foreign_fields_are_not_drift() {
        let want = json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [
            {"name": "server", "image": "a:1", "readOnlyRootFilesystem": false,
             "resources": {"limits": {"cpu": "0.5", "memory": "1Gi"}}}]}}}});
        let live = json!({"spec": {"replicas": 2, "revisionHistoryLimit": 10, "template": {"spec": {
            "containers": [{"name": "server", "image": "a:1", "terminationMessagePath": "/dev/termination-log",
             "resources": {"limits": {"cpu": "500m", "memory": "1073741824"}}}]}}}});
        assert_eq!(first_difference(&live, &want), None);
    }

    #[test]
    fn a_changed_owned_field_is_drift_and_names_its_path() {
        let want = json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "server", "image": "a:1"}]}}}});
        let scaled = json!({"spec": {"replicas": 0, "template": {"spec": {"containers": [{"name": "server", "image": "a:1"}]}}}});
        assert_eq!(
            first_difference(&scaled, &want).as_deref(),
            Some(".spec.replicas")
        );
        let edited = json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "server", "image": "b:2"}]}}}});
        assert_eq!(
            first_difference(&edited, &want).as_deref(),
            Some(".spec.template.spec.containers[0].image")
        );
        let removed =
            json!({"spec": {"template": {"spec": {"containers": [{"name": "server", "image": "a:1"}]}}}});
        assert_eq!(
            first_difference(&removed, &want).as_deref(),
            Some(".spec.replicas")
        );
        let extra = json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [
            {"name": "server", "image": "a:1"}, {"name": "sidecar"}]}}}});
        assert!(
            first_difference(&extra, &want)
                .unwrap()
                .contains("length 2 instead of 1")
        );
    }

    #[test]
    fn quantities_compare_by_value() {
        for (a, b) in [
            ("500m", "0.5"),
            ("1Gi", "1073741824"),
            ("1k", "1000"),
            ("2", "2000m"),
            ("1e3", "1k"),
        ] {
            assert!(close(quantity(a).unwrap(), quantity(b).unwrap()), "{a} {b}");
        }
        assert_ne!(quantity("1Gi"), quantity("1G"));
        assert_eq!(quantity("a:1"), None);
        assert_eq!(quantity("Mi"), None);
        assert_eq!(
            first_difference(&json!({"image": "1"}), &json!({"image": "1000m"})).as_deref(),
            Some(".image"),
            "only resource quantities compare by value"
        );
    }
}
