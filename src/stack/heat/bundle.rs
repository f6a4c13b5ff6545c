//! The body of a stack create: the template as read from disk, every file it names
//! (`get_file` targets, environment files and the templates their `resource_registry`
//! names), and the environment files in order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::stack::StackSpec;

/// The create/validate request body: the template text as on disk, `files` and
/// `environment_files`. Errors name the file.
pub(super) fn stack_body(spec: &StackSpec) -> Result<Value, String> {
    let mut files = BTreeMap::new();
    let template = read(&spec.template, "template")?;
    template_files(&spec.template, &template, &mut files, 0)?;
    let mut env_names = Vec::new();
    for f in &spec.environment_files {
        let content = read(f, "environment file")?;
        let ev: serde_yaml::Value = serde_yaml::from_str(&content)
            .map_err(|e| format!("environment file {}: not YAML: {e}", f.display()))?;
        let edir = f.parent().unwrap_or(Path::new("."));
        if let Some(reg) = ev.get("resource_registry") {
            let mut names = Vec::new();
            registry_templates(reg, &mut names);
            for n in names {
                if let Some(p) = local_ref(&n, edir) {
                    let what = format!("environment file {}: resource_registry", f.display());
                    let c = read(&p, &what)?;
                    add_file(&mut files, &n, &c)?;
                    template_files(&p, &c, &mut files, 1)?;
                }
            }
        }
        let abs = std::path::absolute(f).unwrap_or_else(|_| f.clone());
        let name = format!("file://{}", abs.display());
        add_file(&mut files, &name, &content)?;
        env_names.push(name);
    }
    let mins = spec.timeout.as_secs().div_ceil(60).max(1);
    let mut parameters: BTreeMap<&str, &str> = spec
        .parameters
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for (k, v) in &spec.secret_parameters {
        parameters.insert(k.as_str(), v.expose());
    }
    Ok(json!({
        "stack_name": spec.name,
        "template": template,
        "files": files,
        "environment_files": env_names,
        "parameters": parameters,
        "timeout_mins": mins,
        "disable_rollback": true,
    }))
}
/// Add to `files` what a template needs from disk: its `get_file` targets and the nested
/// templates its resources name as their type (recursively), keyed by the reference as
/// written, resolved relative to the template's directory.
pub(super) fn template_files(
    path: &Path,
    text: &str,
    files: &mut BTreeMap<String, String>,
    depth: u32,
) -> Result<(), String> {
    if depth > 8 {
        return Err(format!(
            "template {}: nested more than 8 deep",
            path.display()
        ));
    }
    let v: serde_yaml::Value = serde_yaml::from_str(text)
        .map_err(|e| format!("template {}: not YAML: {e}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut refs = Vec::new();
    get_file_refs(&v, &mut refs);
    for r in refs {
        if let Some(p) = local_ref(&r, dir) {
            let content = read(&p, &format!("template {}: get_file", path.display()))?;
            add_file(files, &r, &content)?;
        }
    }
    if let Some(res) = v.get("resources").and_then(serde_yaml::Value::as_mapping) {
        for r in res.values() {
            let Some(t) = r.get("type").and_then(serde_yaml::Value::as_str) else {
                continue;
            };
            if !is_template_name(t) {
                continue;
            }
            if let Some(p) = local_ref(t, dir) {
                let what = format!("template {}: nested template", path.display());
                let content = read(&p, &what)?;
                add_file(files, t, &content)?;
                template_files(&p, &content, files, depth + 1)?;
            }
        }
    }
    Ok(())
}
pub(super) fn add_file(
    files: &mut BTreeMap<String, String>,
    key: &str,
    content: &str,
) -> Result<(), String> {
    match files.get(key) {
        Some(old) if old != content => Err(format!(
            "files: {key:?} names two different files (relative to different templates); use distinct names"
        )),
        _ => {
            files.insert(key.to_string(), content.to_string());
            Ok(())
        }
    }
}
pub(super) fn is_template_name(s: &str) -> bool {
    !s.contains("::")
        && [".yaml", ".yml", ".template"]
            .iter()
            .any(|e| s.ends_with(e))
}
pub(super) fn read(p: &Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(p).map_err(|e| format!("{what} {}: {e}", p.display()))
}
/// A `get_file` or registry reference to a local file: `file://` URLs and relative or
/// absolute paths (relative to `dir`); `None` for other URLs (Heat fetches those itself,
/// or refuses).
pub(super) fn local_ref(r: &str, dir: &Path) -> Option<PathBuf> {
    if let Some(p) = r.strip_prefix("file://") {
        return Some(PathBuf::from(p));
    }
    if r.contains("://") {
        return None;
    }
    Some(dir.join(r))
}
pub(super) fn get_file_refs(v: &serde_yaml::Value, out: &mut Vec<String>) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            for (k, val) in m {
                if k.as_str() == Some("get_file") {
                    if let Some(s) = val.as_str() {
                        out.push(s.to_string());
                        continue;
                    }
                }
                get_file_refs(val, out);
            }
        }
        serde_yaml::Value::Sequence(s) => s.iter().for_each(|x| get_file_refs(x, out)),
        serde_yaml::Value::Tagged(t) => get_file_refs(&t.value, out),
        _ => {}
    }
}
/// Registry values that name template files (not other resource types).
pub(super) fn registry_templates(v: &serde_yaml::Value, out: &mut Vec<String>) {
    match v {
        serde_yaml::Value::Mapping(m) => m.values().for_each(|x| registry_templates(x, out)),
        serde_yaml::Value::String(s)
            if !s.contains("::")
                && [".yaml", ".yml", ".template"]
                    .iter()
                    .any(|e| s.ends_with(e)) =>
        {
            out.push(s.clone())
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_body_carries_get_file_targets_and_environment_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("scripts")).unwrap();
        std::fs::write(d.join("scripts/hello.sh"), "echo hello\n").unwrap();
        std::fs::write(d.join("nested.yaml"), "heat_template_version: 2018-08-31\n").unwrap();
        std::fs::write(
            d.join("t.yaml"),
            "heat_template_version: 2018-08-31\nresources:\n  c:\n    type: OS::Heat::Value\n    properties:\n      value: {get_file: scripts/hello.sh}\n  n:\n    type: sub/inner.yaml\n",
        )
        .unwrap();
        // A nested template with its own get_file, relative to its own directory.
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/inner.txt"), "inner\n").unwrap();
        std::fs::write(
            d.join("sub/inner.yaml"),
            "heat_template_version: 2018-08-31\noutputs:\n  o: {value: {get_file: inner.txt}}\n",
        )
        .unwrap();
        std::fs::write(
            d.join("e1.yaml"),
            "resource_registry:\n  OS::Nova::Server: OS::Heat::None\n  My::Thing: nested.yaml\n",
        )
        .unwrap();
        std::fs::write(d.join("e2.yaml"), "parameter_defaults: {a: b}\n").unwrap();
        let spec = StackSpec {
            secret_parameters: Default::default(),
            name: "s".into(),
            template: d.join("t.yaml"),
            parameters: [("p".to_string(), "v".to_string())].into(),
            environment_files: vec![d.join("e1.yaml"), d.join("e2.yaml")],
            timeout: Duration::from_secs(61),
        };
        let b = stack_body(&spec).unwrap();
        assert_eq!(b["files"]["scripts/hello.sh"], "echo hello\n");
        assert!(b["files"]["sub/inner.yaml"]
            .as_str()
            .unwrap()
            .contains("inner.txt"));
        assert_eq!(b["files"]["inner.txt"], "inner\n");
        assert_eq!(
            b["files"]["nested.yaml"],
            "heat_template_version: 2018-08-31\n"
        );
        let envs = b["environment_files"].as_array().unwrap();
        assert_eq!(envs.len(), 2);
        assert!(envs[0].as_str().unwrap().ends_with("/e1.yaml"));
        assert!(b["files"][envs[1].as_str().unwrap()]
            .as_str()
            .unwrap()
            .contains("parameter_defaults"));
        assert_eq!(b["timeout_mins"], 2);
        assert_eq!(b["parameters"]["p"], "v");
        assert!(b["template"]
            .as_str()
            .unwrap()
            .starts_with("heat_template_version"));

        let mut bad = spec.clone();
        bad.environment_files = vec![d.join("missing.yaml")];
        let e = stack_body(&bad).unwrap_err();
        assert!(
            e.contains("environment file") && e.contains("missing.yaml"),
            "{e}"
        );
    }
}
