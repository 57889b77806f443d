//! Strict field validation without a cluster, as the apiserver does it for `kubectl apply`
//! (`--validate=strict`): every field of a ModelDeployment must be declared in the CRD's schema and
//! have the declared type. `render` runs it so a typo (`acelerator`, `replcas`) is an error naming
//! the field path instead of a field that silently does nothing.

use serde_json::Value;

/// Top-level fields of every Kubernetes object besides `spec` and `status`.
const OBJECT_FIELDS: &[&str] = &["apiVersion", "kind", "metadata"];

/// The fields of `ObjectMeta` (the apiserver checks `metadata` against it).
const METADATA_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// Checks `object` against `schema` (a CRD version's `openAPIV3Schema`). Returns every problem,
/// each naming its field path (`spec.model.uri`), or an empty list.
pub fn check(object: &Value, schema: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(fields) = object.as_object() else {
        return vec![format!("expected an object, got {}", describe(object))];
    };
    let declared = schema.get("properties").and_then(Value::as_object);
    for (key, value) in fields {
        if OBJECT_FIELDS.contains(&key.as_str()) {
            if key == "metadata" {
                check_metadata(value, &mut problems);
            } else if !value.is_string() {
                problems.push(format!("{key}: expected string, got {}", describe(value)));
            }
            continue;
        }
        match declared.and_then(|d| d.get(key)) {
            Some(s) => walk(value, s, key, &mut problems),
            None => problems.push(unknown(key, key, names(declared))),
        }
    }
    problems
}

fn check_metadata(value: &Value, problems: &mut Vec<String>) {
    let Some(fields) = value.as_object() else {
        problems.push(format!("metadata: expected object, got {}", describe(value)));
        return;
    };
    for (key, v) in fields {
        let path = format!("metadata.{key}");
        if !METADATA_FIELDS.contains(&key.as_str()) {
            problems.push(unknown(&path, key, METADATA_FIELDS.to_vec()));
        } else if matches!(key.as_str(), "labels" | "annotations") {
            // Label and annotation values are strings: `version: 1` must be quoted.
            match v.as_object() {
                Some(m) => {
                    for (k, x) in m.iter().filter(|(_, x)| !x.is_string()) {
                        problems.push(format!(
                            "{path}.{k}: expected string, got {} (quote it)",
                            describe(x)
                        ));
                    }
                }
                None if v.is_null() => {}
                None => problems.push(format!("{path}: expected object, got {}", describe(v))),
            }
        }
    }
}

fn walk(value: &Value, schema: &Value, path: &str, problems: &mut Vec<String>) {
    // Nulls are pruned by the apiserver before validation (and mean "unset" to us).
    if value.is_null() {
        return;
    }
    let flag = |name: &str| schema.get(name).and_then(Value::as_bool) == Some(true);
    if flag("x-kubernetes-int-or-string") {
        if !(value.is_string() || value.is_i64() || value.is_u64()) {
            problems.push(format!(
                "{path}: expected integer or string, got {}",
                describe(value)
            ));
        }
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str);
    let ok = match ty {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("boolean") => value.is_boolean(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        _ => true,
    };
    if !ok {
        problems.push(format!(
            "{path}: expected {}, got {}",
            ty.unwrap_or("a value"),
            describe(value)
        ));
        return;
    }
    match value {
        Value::Object(fields) => {
            let declared = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            for (key, v) in fields {
                let sub = format!("{path}.{key}");
                if let Some(s) = declared.and_then(|d| d.get(key)) {
                    walk(v, s, &sub, problems);
                } else if let Some(s) = additional.filter(|a| a.is_object()) {
                    walk(v, s, &sub, problems);
                } else if !(flag("x-kubernetes-preserve-unknown-fields")
                    || additional.and_then(Value::as_bool) == Some(true))
                {
                    problems.push(unknown(&sub, key, names(declared)));
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    walk(v, s, &format!("{path}[{i}]"), problems);
                }
            }
        }
        _ => {}
    }
}

fn names(declared: Option<&serde_json::Map<String, Value>>) -> Vec<&str> {
    declared
        .map(|d| d.keys().map(String::as_str).collect())
        .unwrap_or_default()
}

/// `unknown field "spec.acelerator"`, with the closest declared name when one is a near miss.
fn unknown(path: &str, key: &str, declared: Vec<&str>) -> String {
    let near = declared
        .into_iter()
        .map(|n| (distance(key, n), n))
        .filter(|(d, _)| *d <= 2.max(key.len() / 4))
        .min();
    match near {
        Some((_, name)) => format!("unknown field \"{path}\" (did you mean \"{name}\"?)"),
        None => format!("unknown field \"{path}\""),
    }
}

/// Edit distance (insertions, deletions, substitutions), case-insensitive.
fn distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (
        a.to_lowercase().chars().collect(),
        b.to_lowercase().chars().collect(),
    );
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1).min(row[j] + 1).min(prev + usize::from(ca != cb));
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;
    use kubemaas_crds::v1alpha1::ModelDeployment;
    use serde_json::json;

    fn schema() -> Value {
        let crd = ModelDeployment::crd();
        serde_json::to_value(&crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema).unwrap()
    }

    fn md(spec: Value) -> Value {
        json!({"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelDeployment",
               "metadata": {"name": "m", "labels": {"team": "a"}}, "spec": spec})
    }

    #[test]
    fn a_valid_manifest_has_no_problems() {
        let spec = json!({"model": {"uri": "s3://b/m.onnx"}, "replicas": 2, "accelerator": "cuda",
            "gpu": {"count": 1}, "rollout": {"maxSurge": "25%", "maxUnavailable": 0},
            "podTemplate": {"nodeSelector": {"a": "b"}}, "autoscaling": null});
        assert_eq!(check(&md(spec), &schema()), Vec::<String>::new());
    }

    #[test]
    fn typos_are_unknown_fields_with_a_suggestion() {
        let spec = json!({"model": {"uri": "s3://b/m.onnx", "sha": "x"}, "replcas": 2, "acelerator": "cuda"});
        let got = check(&md(spec), &schema());
        assert!(
            got.contains(&"unknown field \"spec.replcas\" (did you mean \"replicas\"?)".to_string()),
            "{got:?}"
        );
        assert!(
            got.contains(&"unknown field \"spec.acelerator\" (did you mean \"accelerator\"?)".to_string()),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|p| p.starts_with("unknown field \"spec.model.sha\"")),
            "{got:?}"
        );
        assert_eq!(got.len(), 3, "{got:?}");
    }

    #[test]
    fn wrong_types_name_the_path() {
        let spec = json!({"model": {"uri": 5}, "replicas": "3", "gpu": {"count": 1.5}, "rollout": {"maxSurge": true}});
        let mut got = check(&md(spec), &schema());
        got.sort();
        assert_eq!(
            got,
            [
                "spec.gpu.count: expected integer, got number 1.5",
                "spec.model.uri: expected string, got number 5",
                "spec.replicas: expected integer, got string \"3\"",
                "spec.rollout.maxSurge: expected integer or string, got boolean true",
            ]
        );
    }

    #[test]
    fn metadata_and_top_level_are_checked_too() {
        let obj = json!({"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "m", "lables": {}, "labels": {"v": 1}}, "spce": {}});
        let mut got = check(&obj, &schema());
        got.sort();
        assert_eq!(
            got,
            [
                "metadata.labels.v: expected string, got number 1 (quote it)",
                "unknown field \"metadata.lables\" (did you mean \"labels\"?)",
                "unknown field \"spce\" (did you mean \"spec\"?)",
            ]
        );
    }
}
