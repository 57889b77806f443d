//! A model's own settings from Triton's `config.pbtxt` in its repository directory
//! (`DIR/<model>/config.pbtxt`), in protobuf text format, read against the same `ModelConfig`
//! message `/config` answers with. Where a model has one, its settings replace the server's flags
//! for that model: dynamic batching, instances and their kind, and which versions are served.
//!
//! Every field this message has is honoured or checked; a field it does not have (Triton has
//! many more) is refused by the parser with its name, so nothing in the file is silently ignored.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prost_reflect::{DescriptorPool, DynamicMessage};

use crate::backend::Signature;
use crate::grpc::pb::{self, ModelConfig, model_instance_group::Kind, model_version_policy::PolicyChoice};

/// The file name Triton reads in a model's directory.
pub const FILE_NAME: &str = "config.pbtxt";

/// What a model's `config.pbtxt` says, once checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    /// Dynamic batching for this model: `None` turns it off whatever the flags say.
    pub batching: Option<BatchSettings>,
    /// Instances, when the file has an `instance_group`.
    pub instances: Option<InstanceSettings>,
    /// Inputs and outputs the file declares, checked against the model once it is loaded.
    pub declared: Declared,
    /// The versions served (Triton's default with a file: the latest).
    pub version_policy: VersionPolicy,
}

/// Dynamic batching as a model's file sets it.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSettings {
    /// `max_batch_size`.
    pub max_batch_size: usize,
    /// `dynamic_batching.max_queue_delay_microseconds` (0 without the block).
    pub max_queue_delay: Duration,
    /// `dynamic_batching.default_queue_policy.max_queue_size`; None: the server's flag.
    pub max_queue_size: Option<usize>,
    /// `dynamic_batching.preferred_batch_size`.
    pub preferred_batch_sizes: Vec<usize>,
    /// Whether the file has a `dynamic_batching` block: only then are requests joined (Triton's
    /// default scheduler runs each request as sent).
    pub dynamic: bool,
}

/// An `instance_group`.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSettings {
    /// Instances in all: `count` on each listed GPU, or `count`.
    pub count: usize,
    /// Where they run.
    pub kind: InstanceKind,
    /// `gpus`: the CUDA devices, for `KIND_GPU`.
    pub gpus: Vec<i32>,
}

/// `instance_group.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceKind {
    /// `KIND_AUTO`: the server's `--execution-provider`.
    Auto,
    /// `KIND_CPU`: the CPU, whatever the server's execution provider.
    Cpu,
    /// `KIND_GPU`: CUDA, or the model fails to load.
    Gpu,
}

/// One tensor a file declares: name, Triton type name and dims (without the batch dimension when
/// the model batches).
pub type DeclaredTensor = (String, &'static str, Vec<i64>);

/// Tensors a file declares.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Declared {
    /// `input`.
    pub inputs: Vec<DeclaredTensor>,
    /// `output`.
    pub outputs: Vec<DeclaredTensor>,
}

/// A model directory's version policy (Triton's default with a file: the latest one).
#[derive(Debug, Clone, PartialEq)]
pub enum VersionPolicy {
    /// Every version.
    All,
    /// The highest `n`.
    Latest(usize),
    /// These.
    Specific(Vec<u64>),
}

impl VersionPolicy {
    /// The versions of `found` (ascending) that are served.
    pub fn select(&self, found: &[u64]) -> Vec<u64> {
        match self {
            VersionPolicy::All => found.to_vec(),
            VersionPolicy::Latest(n) => found[found.len().saturating_sub(*n)..].to_vec(),
            VersionPolicy::Specific(v) => found.iter().copied().filter(|f| v.contains(f)).collect(),
        }
    }
}

/// A model directory's `config.pbtxt`, read: its settings and version policy, or why it cannot be
/// used (the model's versions then fail to load with that message).
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigFile {
    /// No file: the flags apply, every version is served.
    Absent,
    /// A valid file.
    Valid(Arc<ModelSettings>),
    /// A file that cannot be used, and why.
    Invalid(String),
}

/// Errors in a `config.pbtxt`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not protobuf text format, or a field `ModelConfig` does not have.
    #[error(
        "{path}: {message}; the fields KubeMaaS reads are name, platform, backend, version_policy, \
         max_batch_size, input, output, instance_group {{count, kind, gpus}} and dynamic_batching \
         {{preferred_batch_size, max_queue_delay_microseconds, default_queue_policy {{max_queue_size}}}}"
    )]
    Parse {
        /// The file.
        path: String,
        /// What the parser said.
        message: String,
    },
    /// A value that cannot be honoured.
    #[error("{path}: {message}")]
    Value {
        /// The file.
        path: String,
        /// What to fix.
        message: String,
    },
    /// The file cannot be read.
    #[error("failed to read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

fn pool() -> Option<&'static DescriptorPool> {
    static POOL: OnceLock<Option<DescriptorPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(&include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"))[..]).ok()
    })
    .as_ref()
}

/// Parses the text of a `config.pbtxt` (`path` for messages) into `ModelConfig`.
pub fn parse(path: &str, text: &str) -> Result<ModelConfig, ConfigError> {
    let parse_error = |message: String| ConfigError::Parse {
        path: path.into(),
        message,
    };
    let desc = pool()
        .and_then(|p| p.get_message_by_name("inference.ModelConfig"))
        .ok_or_else(|| parse_error("the server's ModelConfig descriptor is missing".into()))?;
    let text = colon_before_lists(text);
    let message = DynamicMessage::parse_text_format(desc, &text).map_err(|e| parse_error(e.to_string()))?;
    message
        .transcode_to::<ModelConfig>()
        .map_err(|e| parse_error(e.to_string()))
}

/// `text` with a ':' between a field name and a list that follows it without one
/// (`input [ { ... } ]`, as Triton's configs write lists of messages; the text format allows it,
/// the parser used here does not). Strings and comments are left as they are.
fn colon_before_lists(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut chars = text.chars().peekable();
    // Whether the last token written was an identifier (possibly followed by whitespace).
    let mut after_ident = false;
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                out.push(c);
                while let Some(d) = chars.next() {
                    out.push(d);
                    if d == '\\' {
                        if let Some(e) = chars.next() {
                            out.push(e);
                        }
                    } else if d == c || d == '\n' {
                        break;
                    }
                }
                after_ident = false;
            }
            '#' => {
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == '\n' {
                        break;
                    }
                }
            }
            '[' if after_ident => {
                out.push_str(": [");
                after_ident = false;
            }
            c if c.is_ascii_alphanumeric() || c == '_' => {
                let starts = !out.ends_with(|p: char| p.is_ascii_alphanumeric() || p == '_' || p == '.');
                out.push(c);
                // A token that starts with a digit is a number, not a field name.
                if starts {
                    after_ident = !c.is_ascii_digit();
                }
            }
            c if c.is_whitespace() => out.push(c),
            c => {
                out.push(c);
                after_ident = false;
            }
        }
    }
    out
}

/// Reads `dir/config.pbtxt` for the model named `name` (the directory's name).
pub fn read(dir: &Path, name: &str) -> ConfigFile {
    let path = dir.join(FILE_NAME);
    let shown = path.display().to_string();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return ConfigFile::Absent,
        Err(source) => {
            let e = ConfigError::Read { path: shown, source };
            return ConfigFile::Invalid(e.to_string());
        }
    };
    match parse(&shown, &text).and_then(|c| settings(&shown, name, &c)) {
        Ok(s) => ConfigFile::Valid(Arc::new(s)),
        Err(e) => ConfigFile::Invalid(e.to_string()),
    }
}

impl ConfigFile {
    /// The versions served: the file's policy; every version without a usable file (so each
    /// version of a model whose file is invalid is listed and says why it does not load).
    pub fn version_policy(&self) -> VersionPolicy {
        match self {
            ConfigFile::Valid(s) => s.version_policy.clone(),
            _ => VersionPolicy::All,
        }
    }
}

/// Checks a parsed file and turns it into settings for the model named `name`.
pub fn settings(path: &str, name: &str, c: &ModelConfig) -> Result<ModelSettings, ConfigError> {
    let bad = |message: String| ConfigError::Value {
        path: path.into(),
        message,
    };
    if !c.name.is_empty() && c.name != name {
        return Err(bad(format!(
            "name is {:?} but the model's directory is {name:?}; make them the same or leave name out",
            c.name
        )));
    }
    if !c.platform.is_empty() && c.platform != crate::protocol::v2::PLATFORM {
        return Err(bad(format!(
            "platform {:?} is not served here; KubeMaaS serves {:?} (ONNX Runtime)",
            c.platform,
            crate::protocol::v2::PLATFORM
        )));
    }
    if !c.backend.is_empty() && c.backend != "onnxruntime" {
        return Err(bad(format!(
            "backend {:?} is not served here; KubeMaaS serves \"onnxruntime\"",
            c.backend
        )));
    }
    if !c.parameters.is_empty() {
        let keys: Vec<&String> = c.parameters.keys().collect();
        return Err(bad(format!(
            "parameters {keys:?} are not read by KubeMaaS; set the server's flags instead and remove them"
        )));
    }
    let policy = match c.version_policy.as_ref().and_then(|p| p.policy_choice.as_ref()) {
        None => VersionPolicy::Latest(1),
        Some(PolicyChoice::All(_)) => VersionPolicy::All,
        Some(PolicyChoice::Latest(l)) if l.num_versions >= 1 => {
            VersionPolicy::Latest(l.num_versions as usize)
        }
        Some(PolicyChoice::Latest(_)) => {
            return Err(bad("version_policy.latest.num_versions must be at least 1".into()));
        }
        Some(PolicyChoice::Specific(s)) => {
            if s.versions.is_empty() || s.versions.iter().any(|&v| v < 1) {
                return Err(bad(
                    "version_policy.specific.versions must list versions, each at least 1".into(),
                ));
            }
            VersionPolicy::Specific(s.versions.iter().map(|&v| v as u64).collect())
        }
    };
    let max_batch_size = usize::try_from(c.max_batch_size).map_err(|_| {
        bad(format!(
            "max_batch_size must not be negative, got {}",
            c.max_batch_size
        ))
    })?;
    let batching = match (max_batch_size, &c.dynamic_batching) {
        (0, Some(_)) => {
            return Err(bad(
                "dynamic_batching needs max_batch_size above 0 (the most rows in one execution)".into(),
            ));
        }
        (0, None) => None,
        (max, block) => {
            let d = block.clone().unwrap_or_default();
            let mut preferred = Vec::with_capacity(d.preferred_batch_size.len());
            for &p in &d.preferred_batch_size {
                match usize::try_from(p) {
                    Ok(p) if (1..=max).contains(&p) => preferred.push(p),
                    _ => {
                        return Err(bad(format!(
                            "dynamic_batching.preferred_batch_size {p} must be between 1 and max_batch_size ({max})"
                        )));
                    }
                }
            }
            let delay = d.max_queue_delay_microseconds;
            if delay > 86_400_000_000 {
                return Err(bad(format!(
                    "dynamic_batching.max_queue_delay_microseconds {delay} is more than a day"
                )));
            }
            let size = d.default_queue_policy.as_ref().map_or(0, |q| q.max_queue_size);
            Some(BatchSettings {
                max_batch_size: max,
                max_queue_delay: Duration::from_micros(delay),
                max_queue_size: (size > 0).then_some(size as usize),
                preferred_batch_sizes: preferred,
                dynamic: block.is_some(),
            })
        }
    };
    let instances = match c.instance_group.as_slice() {
        [] => None,
        [g] => Some(instance_group(g).map_err(bad)?),
        _ => {
            return Err(bad(format!(
                "{} instance groups; KubeMaaS runs one group per model (count, kind, gpus)",
                c.instance_group.len()
            )));
        }
    };
    let tensors = |list: Vec<(&str, i32, &[i64])>, what: &str| -> Result<Vec<DeclaredTensor>, ConfigError> {
        list.into_iter()
            .map(|(n, t, dims)| {
                let ty = pb::DataType::try_from(t)
                    .ok()
                    .filter(|t| *t != pb::DataType::TypeInvalid)
                    .and_then(|t| crate::tensor::DataType::from_triton_name(t.as_str_name()))
                    .ok_or_else(|| {
                        bad(format!(
                            "{what} {n:?} needs a data_type (TYPE_FP32, TYPE_INT64, ...)"
                        ))
                    })?;
                if dims.iter().any(|&d| d < -1) {
                    return Err(bad(format!(
                        "{what} {n:?} dims must be -1 (any) or sizes, got {dims:?}"
                    )));
                }
                Ok((n.to_string(), ty.triton_name(), dims.to_vec()))
            })
            .collect()
    };
    let declared = Declared {
        inputs: tensors(
            c.input
                .iter()
                .map(|i| (i.name.as_str(), i.data_type, i.dims.as_slice()))
                .collect(),
            "input",
        )?,
        outputs: tensors(
            c.output
                .iter()
                .map(|o| (o.name.as_str(), o.data_type, o.dims.as_slice()))
                .collect(),
            "output",
        )?,
    };
    Ok(ModelSettings {
        batching,
        instances,
        declared,
        version_policy: policy,
    })
}

fn instance_group(g: &pb::ModelInstanceGroup) -> Result<InstanceSettings, String> {
    // Triton names the instances after it; here they are not named, and `/config` reports the
    // group under the model's name, so a name would be accepted and ignored.
    if !g.name.is_empty() {
        return Err(format!(
            "instance_group name {:?} is not used by KubeMaaS (the group takes the model's name); leave it out",
            g.name
        ));
    }
    // Triton's default count is 1.
    let count = match g.count {
        0 => 1,
        n if (1..=256).contains(&n) => n as usize,
        n => return Err(format!("instance_group count must be between 1 and 256, got {n}")),
    };
    let kind = match Kind::try_from(g.kind) {
        Ok(Kind::Auto) => InstanceKind::Auto,
        Ok(Kind::Cpu) => InstanceKind::Cpu,
        Ok(Kind::Gpu) => InstanceKind::Gpu,
        _ => {
            return Err(
                "instance_group kind must be KIND_AUTO, KIND_CPU or KIND_GPU (KIND_MODEL is not served here)"
                    .into(),
            );
        }
    };
    if !g.gpus.is_empty() && kind != InstanceKind::Gpu {
        return Err("instance_group gpus are for kind KIND_GPU".into());
    }
    if let Some(d) = g.gpus.iter().find(|&&d| d < 0) {
        return Err(format!(
            "instance_group gpus must be device ordinals (0, 1, ...), got {d}"
        ));
    }
    // As in Triton, `count` instances on each listed GPU.
    let total = count * g.gpus.len().max(1);
    if total > 256 {
        return Err(format!("instance_group asks for {total} instances; at most 256"));
    }
    Ok(InstanceSettings {
        count: total,
        kind,
        gpus: g.gpus.clone(),
    })
}

impl ModelSettings {
    /// Checks the file against the loaded model: the tensors it declares, and that a model it
    /// batches can be batched (every input and output with a dynamic first dimension).
    pub fn check(&self, sig: &Signature) -> Result<(), String> {
        self.declared.check(sig, self.batching.is_some())?;
        if self.batching.is_some() {
            crate::batcher::batchable(sig)
                .map_err(|why| format!("{FILE_NAME}: max_batch_size is above 0 but {why}"))?;
        }
        Ok(())
    }
}

impl BatchSettings {
    /// The batcher's configuration; `max_queue_size` is the server's unless the file sets one.
    pub fn config(&self, max_queue_size: usize) -> crate::batcher::BatchConfig {
        crate::batcher::BatchConfig {
            max_batch_size: self.max_batch_size,
            max_queue_delay: self.max_queue_delay,
            max_queue_size: self.max_queue_size.unwrap_or(max_queue_size),
            pad_to: Vec::new(),
            preferred_batch_sizes: self.preferred_batch_sizes.clone(),
            combine: self.dynamic,
        }
    }
}

impl Declared {
    /// Checks the declared tensors against the loaded model's signature: each must exist, with
    /// the same type, and dims that agree (-1 agrees with anything; a size the file fixes must be
    /// one the model fixes too, since shapes are taken from the model). `batched`: the dims
    /// leave out the batch dimension (`max_batch_size` > 0).
    fn check(&self, sig: &Signature, batched: bool) -> Result<(), String> {
        let skip = usize::from(batched);
        for (what, declared, specs) in [
            ("input", &self.inputs, &sig.inputs),
            ("output", &self.outputs, &sig.outputs),
        ] {
            for (name, ty, dims) in declared {
                let Some(spec) = specs.iter().find(|s| &s.name == name) else {
                    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
                    return Err(format!(
                        "{FILE_NAME} declares {what} {name:?}, which the model does not have (its {what}s: {names:?})"
                    ));
                };
                if spec.datatype.triton_name() != *ty {
                    return Err(format!(
                        "{FILE_NAME} declares {what} {name:?} as {ty} but the model's is {}",
                        spec.datatype.triton_name()
                    ));
                }
                let model_dims = &spec.shape[skip.min(spec.shape.len())..];
                let agree = model_dims.len() == dims.len()
                    && model_dims.iter().zip(dims).all(|(&m, &d)| d == -1 || m == d);
                if !agree {
                    return Err(format!(
                        "{FILE_NAME} declares {what} {name:?} with dims {dims:?} but the model's are {model_dims:?}{}; use -1 where the model's size is dynamic",
                        if skip == 1 {
                            " (without the batch dimension)"
                        } else {
                            ""
                        }
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings_of(text: &str) -> Result<ModelSettings, String> {
        parse("m/config.pbtxt", text)
            .and_then(|c| settings("m/config.pbtxt", "m", &c))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn tritons_batching_and_instance_fields_are_read() {
        let s = settings_of(
            r#"
            name: "m"
            platform: "onnxruntime_onnx"
            max_batch_size: 8
            dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100
              default_queue_policy { max_queue_size: 32 } }
            instance_group [ { count: 2 kind: KIND_CPU } ]
            input [ { name: "x" data_type: TYPE_FP32 dims: [ 10 ] } ]
            "#,
        )
        .unwrap();
        assert_eq!(
            s.batching,
            Some(BatchSettings {
                max_batch_size: 8,
                max_queue_delay: Duration::from_micros(100),
                max_queue_size: Some(32),
                preferred_batch_sizes: vec![4, 8],
                dynamic: true,
            })
        );
        assert_eq!(
            s.instances,
            Some(InstanceSettings {
                count: 2,
                kind: InstanceKind::Cpu,
                gpus: vec![]
            })
        );
        assert_eq!(s.declared.inputs, vec![("x".into(), "TYPE_FP32", vec![10])]);
        assert_eq!(
            s.version_policy,
            VersionPolicy::Latest(1),
            "Triton's default with a file"
        );
    }

    #[test]
    fn an_unknown_field_or_an_unusable_value_is_refused_by_name() {
        let e = settings_of("max_batch_size: 4\noptimization { }").unwrap_err();
        assert!(
            e.contains("optimization") && e.contains("fields KubeMaaS reads"),
            "{e}"
        );
        for (text, expect) in [
            ("name: \"other\"", "directory is \"m\""),
            ("dynamic_batching { }", "needs max_batch_size above 0"),
            (
                "max_batch_size: 4 dynamic_batching { preferred_batch_size: 8 }",
                "between 1 and max_batch_size (4)",
            ),
            (
                "instance_group [ { count: 1 }, { count: 2 } ]",
                "one group per model",
            ),
            (
                "instance_group [ { kind: KIND_MODEL } ]",
                "KIND_MODEL is not served",
            ),
            ("instance_group [ { name: \"g\" count: 1 } ]", "leave it out"),
            (
                "instance_group [ { kind: KIND_CPU gpus: 0 } ]",
                "gpus are for kind KIND_GPU",
            ),
            ("platform: \"tensorflow_savedmodel\"", "not served here"),
            (
                "parameters { key: \"k\" value { string_value: \"v\" } }",
                "not read by KubeMaaS",
            ),
            ("version_policy { latest { num_versions: 0 } }", "at least 1"),
            ("input [ { name: \"x\" dims: 1 } ]", "needs a data_type"),
        ] {
            let e = settings_of(text).unwrap_err();
            assert!(e.contains(expect), "{text}: {e}");
        }
    }

    #[test]
    fn lists_of_messages_may_follow_their_name_without_a_colon() {
        assert_eq!(
            colon_before_lists("input [ { dims: [ 1 ] } ] # a [ b\nname: \"x [y\" output\n[ ]"),
            "input : [ { dims: [ 1 ] } ] # a [ b\nname: \"x [y\" output\n: [ ]"
        );
        let s = settings_of("input: [ { name: \"x\" data_type: TYPE_FP32 dims: [ -1 ] } ]").unwrap();
        assert_eq!(s.declared.inputs.len(), 1);
    }

    #[test]
    fn count_is_per_gpu_and_defaults_to_one() {
        let s = settings_of("instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0, 1 ] } ]").unwrap();
        assert_eq!(s.instances.map(|i| (i.count, i.gpus)), Some((4, vec![0, 1])));
        let s = settings_of("instance_group [ { kind: KIND_CPU } ]").unwrap();
        assert_eq!(s.instances.map(|i| i.count), Some(1));
    }

    #[test]
    fn version_policies_select_versions() {
        let found = [1, 2, 5];
        assert_eq!(VersionPolicy::All.select(&found), vec![1, 2, 5]);
        assert_eq!(VersionPolicy::Latest(2).select(&found), vec![2, 5]);
        assert_eq!(VersionPolicy::Latest(9).select(&found), vec![1, 2, 5]);
        assert_eq!(VersionPolicy::Specific(vec![1, 3]).select(&found), vec![1]);
        let s = settings_of("version_policy { specific { versions: [ 1, 2 ] } }").unwrap();
        assert_eq!(s.version_policy, VersionPolicy::Specific(vec![1, 2]));
        let s = settings_of("version_policy { all { } }").unwrap();
        assert_eq!(s.version_policy, VersionPolicy::All);
    }
}
