//! `kubemaas-operator render -f md.yaml`: every child the operator would create, as YAML, without a
//! cluster (for review and GitOps diffs).

use kube::{CustomResourceExt, ResourceExt};
use kubemaas_crds::v1alpha1::ModelDeployment;

use crate::controller::build::{self, BuildConfig};

/// Errors rendering.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The input is not a ModelDeployment.
    #[error("failed to parse a ModelDeployment from {source_name}: {message}")]
    Parse {
        /// File name.
        source_name: String,
        /// Why.
        message: String,
    },
    /// The spec is invalid.
    #[error("ModelDeployment {name} is invalid: {message}")]
    Invalid {
        /// Name.
        name: String,
        /// Why.
        message: String,
    },
    /// A field is not in the CRD's schema, or has the wrong type (what the apiserver's strict
    /// field validation refuses).
    #[error("ModelDeployment {name} in {source_name} is not valid against the CRD schema: {}", .problems.join("; "))]
    Strict {
        /// Name.
        name: String,
        /// File name.
        source_name: String,
        /// Every problem, each with its field path.
        problems: Vec<String>,
    },
    /// The input holds no ModelDeployment.
    #[error("{source_name} holds no ModelDeployment (apiVersion kubemaas.io/v1alpha1){}", found_list(.found))]
    NothingToRender {
        /// File name.
        source_name: String,
        /// `Kind/name` of each object that was found instead.
        found: Vec<String>,
    },
    /// YAML output failed.
    #[error("failed to write YAML: {0}")]
    Yaml(String),
}

fn found_list(found: &[String]) -> String {
    if found.is_empty() {
        ", nor any other object".into()
    } else {
        format!("; found {}", found.join(", "))
    }
}

/// Renders every document of `input` (one or more ModelDeployments separated by `---`).
pub fn render(input: &str, source_name: &str, cfg: &BuildConfig) -> Result<String, RenderError> {
    let parse = |message: String| RenderError::Parse {
        source_name: source_name.into(),
        message,
    };
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(input).map_err(|e| parse(e.to_string()))?;
    // Empty documents (a trailing `---`, comments only) are not objects.
    let docs: Vec<serde_json::Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    let schema = crd_schema().map_err(|e| RenderError::Yaml(e.to_string()))?;
    let mut out = String::new();
    // Other kinds in the file (e.g. the Secret next to a ModelDeployment) are not ours to render.
    let ours = |d: &serde_json::Value| d["kind"] == "ModelDeployment";
    if !docs.iter().any(ours) {
        return Err(RenderError::NothingToRender {
            source_name: source_name.into(),
            found: docs
                .iter()
                .map(|d| {
                    let s = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_string();
                    format!("{}/{}", s(&d["kind"]), s(&d["metadata"]["name"]))
                })
                .collect(),
        });
    }
    for doc in docs.into_iter().filter(ours) {
        let mut problems = crate::strict::check(&doc, &schema);
        if doc["apiVersion"] != "kubemaas.io/v1alpha1" {
            problems.insert(
                0,
                format!(
                    "apiVersion: expected \"kubemaas.io/v1alpha1\", got {}",
                    doc["apiVersion"]
                ),
            );
        }
        if !problems.is_empty() {
            return Err(RenderError::Strict {
                name: doc["metadata"]["name"].as_str().unwrap_or("(unnamed)").into(),
                source_name: source_name.into(),
                problems,
            });
        }
        let mut md: ModelDeployment = serde_json::from_value(doc).map_err(|e| parse(e.to_string()))?;
        if md.metadata.namespace.is_none() {
            md.metadata.namespace = Some("default".into());
        }
        // Without a cluster there is no UID; a placeholder keeps ownerReferences visible in the output.
        md.metadata
            .uid
            .get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".into());
        if let Err(e) = md.validate_cel() {
            return Err(RenderError::Invalid {
                name: md.name_any(),
                message: e.to_string(),
            });
        }
        crate::controller::validate::validate(&md).map_err(|e| RenderError::Invalid {
            name: md.name_any(),
            message: e.to_string(),
        })?;
        let c = build::children(&md, cfg);
        let mut objects: Vec<serde_json::Value> = Vec::new();
        let mut push = |v: Result<serde_json::Value, serde_json::Error>| {
            v.map(|v| objects.push(v))
                .map_err(|e| RenderError::Yaml(e.to_string()))
        };
        push(serde_json::to_value(&c.deployment))?;
        push(serde_json::to_value(&c.service))?;
        if let Some(h) = &c.hpa {
            push(serde_json::to_value(h))?;
        }
        if let Some(p) = &c.pdb {
            push(serde_json::to_value(p))?;
        }
        if let Some(p) = &c.network_policy {
            push(serde_json::to_value(p))?;
        }
        for o in objects {
            out.push_str("---\n");
            out.push_str(&serde_saphyr::to_string(&o).map_err(|e| RenderError::Yaml(e.to_string()))?);
        }
    }
    Ok(out)
}

/// The `openAPIV3Schema` of the CRD's served version, as JSON.
fn crd_schema() -> Result<serde_json::Value, serde_json::Error> {
    let crd = ModelDeployment::crd();
    let schema = crd
        .spec
        .versions
        .iter()
        .find_map(|v| v.schema.as_ref()?.open_api_v3_schema.as_ref());
    serde_json::to_value(schema)
}
