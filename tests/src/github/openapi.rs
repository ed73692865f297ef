//! Checks the fake's traffic against GitHub's OpenAPI description: the operations it serves, cut
//! from `@octokit/openapi` by `tests/fixtures/github/update.sh` into `openapi-subset.json`.
//!
//! A request is matched to an operation by method and path template; its path and query
//! parameters and its JSON body are checked against the operation's parameters and request
//! body schema, and each response the fake sends against the schema documented for its status.
//! Schemas are OpenAPI 3.0 schemas with `nullable` already turned into type unions, so they are
//! checked as JSON Schema draft 4 (what OpenAPI 3.0 builds on), formats included.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::{Value, json};

/// The subset of GitHub's description, embedded so tests never depend on the working directory.
const SUBSET: &str = include_str!("../../fixtures/github/openapi-subset.json");

/// Query parameters GitHub does not document but ignores, which a client we use sends anyway:
/// octocrab 0.54 puts its compare builder's `base` and `head` in the query as well as the path.
/// Any other undocumented query parameter is a violation (GitHub would silently ignore a
/// misspelt filter).
const TOLERATED_QUERY: &[(&str, &str)] = &[
    ("/repos/{owner}/{repo}/compare/{basehead}", "base"),
    ("/repos/{owner}/{repo}/compare/{basehead}", "head"),
];

/// GitHub's description of the operations the fake serves.
pub struct OpenApi {
    document: Arc<Value>,
    /// Path templates split into segments, for matching.
    templates: Vec<(String, Vec<String>)>,
    validators: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

/// What is wrong with a request, by part.
#[derive(Clone, Debug, Default)]
pub struct RequestProblems {
    /// Path and query parameters: missing, undocumented, or not of their schema.
    pub parameters: Vec<String>,
    /// The JSON body: missing, unexpected, or not of its schema (GitHub answers 422).
    pub body: Vec<String>,
}

impl RequestProblems {
    pub fn is_empty(&self) -> bool {
        self.parameters.is_empty() && self.body.is_empty()
    }

    /// Every problem, parameters first.
    pub fn all(&self) -> impl Iterator<Item = &String> {
        self.parameters.iter().chain(&self.body)
    }
}

/// A request matched to an operation of the description.
#[derive(Clone, Debug)]
pub struct Operation {
    /// Upper-case method, as in `GET`.
    pub method: String,
    /// GitHub's path template, as in `/repos/{owner}/{repo}`.
    pub template: String,
    pub operation_id: String,
    /// The path parameters, percent-decoded.
    pub params: BTreeMap<String, String>,
}

impl Operation {
    /// A path parameter (every one the template names is present).
    pub fn param(&self, name: &str) -> &str {
        self.params
            .get(name)
            .map(String::as_str)
            .unwrap_or_default()
    }
}

static DESCRIPTION: LazyLock<OpenApi> = LazyLock::new(|| {
    OpenApi::new(serde_json::from_str(SUBSET).expect("openapi-subset.json is JSON"))
});

/// The description the fake checks against.
pub fn github() -> &'static OpenApi {
    &DESCRIPTION
}

impl OpenApi {
    fn new(document: Value) -> OpenApi {
        let templates = document["paths"]
            .as_object()
            .expect("the description has paths")
            .keys()
            .map(|t| (t.clone(), t.split('/').map(str::to_string).collect()))
            .collect();
        OpenApi {
            document: Arc::new(document),
            templates,
            validators: Mutex::new(HashMap::new()),
        }
    }

    /// The operation `method path` is, if the description has it. A template's last segment
    /// named `{path}` takes the rest of the path (GitHub's contents API).
    pub fn operation(&self, method: &str, path: &str) -> Option<Operation> {
        let segments: Vec<&str> = path.split('/').collect();
        let method = method.to_ascii_uppercase();
        // Literal segments beat parameters: the template with the most literal matches wins.
        let mut best: Option<(usize, Operation)> = None;
        for (template, parts) in &self.templates {
            let Some(op) = self.document["paths"][template].get(method.to_ascii_lowercase()) else {
                continue;
            };
            let Some((literals, params)) = match_template(parts, &segments) else {
                continue;
            };
            if best.as_ref().is_some_and(|(l, _)| *l >= literals) {
                continue;
            }
            best = Some((
                literals,
                Operation {
                    method: method.clone(),
                    template: template.clone(),
                    operation_id: op["operationId"].as_str().unwrap_or_default().to_string(),
                    params,
                },
            ));
        }
        best.map(|(_, op)| op)
    }

    /// Whether the description has `method` on path template `template`.
    pub fn operation_by_template(&self, method: &str, template: &str) -> Option<&Value> {
        self.document["paths"]
            .get(template)?
            .get(method.to_ascii_lowercase())
    }

    fn op_json(&self, op: &Operation) -> &Value {
        &self.document["paths"][&op.template][op.method.to_ascii_lowercase()]
    }

    /// Follows a local `$ref` (`#/components/...`).
    fn resolve<'a>(&'a self, value: &'a Value) -> &'a Value {
        match value.get("$ref").and_then(Value::as_str) {
            Some(reference) => self
                .document
                .pointer(reference.trim_start_matches('#'))
                .map(|target| self.resolve(target))
                .unwrap_or(&Value::Null),
            None => value,
        }
    }

    /// What is wrong with a request for `op` with `query` and `body`.
    pub fn check_request(
        &self,
        op: &Operation,
        query: &[(String, String)],
        body: Option<&Value>,
    ) -> RequestProblems {
        let mut problems = Vec::new();
        let spec = self.op_json(op);
        let raw_parameters = spec["parameters"].as_array().cloned().unwrap_or_default();
        let mut parameters = Vec::new();
        for (i, raw) in raw_parameters.iter().enumerate() {
            let schema_pointer = match raw.get("$ref").and_then(Value::as_str) {
                Some(reference) => format!("{}/schema", reference.trim_start_matches('#')),
                None => format!("{}/parameters/{i}/schema", op_pointer(op)),
            };
            let parameter = self.resolve(raw);
            parameters.push(parameter);
            let name = parameter["name"].as_str().unwrap_or_default();
            let location = parameter["in"].as_str().unwrap_or_default();
            let value = match location {
                "path" => op.params.get(name).cloned(),
                "query" => query
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone()),
                _ => continue,
            };
            match value {
                None if parameter["required"] == true => {
                    problems.push(format!("required {location} parameter `{name}` is missing"));
                }
                None => {}
                Some(value) => {
                    let typed = typed_parameter(&parameter["schema"], &value);
                    for error in self.errors(&schema_pointer, &typed) {
                        problems.push(format!(
                            "{location} parameter `{name}` = {value:?}: {error}"
                        ));
                    }
                }
            }
        }
        for (key, _) in query {
            let known = parameters
                .iter()
                .any(|p| p["in"] == "query" && p["name"] == key.as_str());
            let tolerated = TOLERATED_QUERY
                .iter()
                .any(|(template, name)| *template == op.template && name == key);
            if !known && !tolerated {
                problems.push(format!(
                    "query parameter `{key}` is not one GitHub documents for this operation"
                ));
            }
        }
        let mut body_problems = Vec::new();
        let request_body = self.resolve(&spec["requestBody"]);
        match (body, request_body.is_null()) {
            (Some(_), true) => body_problems.push("this operation takes no request body".into()),
            (None, false) if request_body["required"] == true => {
                body_problems.push("the request body is missing".into());
            }
            (None, _) => {}
            (Some(body), false) => {
                let pointer = format!(
                    "{}/requestBody/content/application~1json/schema",
                    op_pointer(op)
                );
                for error in self.errors(&pointer, body) {
                    body_problems.push(format!("request body: {error}"));
                }
            }
        }
        RequestProblems {
            parameters: problems,
            body: body_problems,
        }
    }

    /// What is wrong with a response of `status` carrying `body` for `op`.
    pub fn check_response(&self, op: &Operation, status: u16, body: Option<&Value>) -> Vec<String> {
        let spec = self.op_json(op);
        let Some(response) = spec["responses"].get(status.to_string()) else {
            // GitHub answers any request with 401/403/404/422 errors of its usual shape, whether
            // or not the description lists them for this operation.
            if status >= 400 {
                return error_shape(body);
            }
            return vec![format!(
                "GitHub does not document status {status} for this operation"
            )];
        };
        let pointer = match response.get("$ref").and_then(Value::as_str) {
            Some(reference) => reference.trim_start_matches('#').to_string(),
            None => format!("{}/responses/{status}", op_pointer(op)),
        };
        let documented = self.resolve(response);
        if documented
            .pointer("/content/application~1json/schema")
            .is_none()
        {
            return Vec::new();
        }
        let Some(body) = body else {
            return vec![format!(
                "the documented response {status} has a JSON body; none was sent"
            )];
        };
        self.errors(&format!("{pointer}/content/application~1json/schema"), body)
            .into_iter()
            .map(|e| format!("response {status}: {e}"))
            .collect()
    }

    /// Validates `instance` against the schema at JSON pointer `pointer` of the description.
    pub fn errors(&self, pointer: &str, instance: &Value) -> Vec<String> {
        let validator = self.validator(pointer);
        validator
            .iter_errors(instance)
            .map(|error| {
                let at = error.instance_path().to_string();
                if at.is_empty() {
                    error.to_string()
                } else {
                    format!("at {at}: {error}")
                }
            })
            .collect()
    }

    fn validator(&self, pointer: &str) -> Arc<jsonschema::Validator> {
        let mut validators = self.validators.lock().unwrap();
        if let Some(validator) = validators.get(pointer) {
            return validator.clone();
        }
        // The whole document is the root, so `#/components/...` references resolve; its own
        // `$ref` points at the schema to check (draft 4 ignores a `$ref`'s siblings).
        // A JSON pointer in a URI fragment escapes what URIs do not allow (GitHub's `{owner}`).
        let fragment = pointer.replace('{', "%7B").replace('}', "%7D");
        let mut root = json!({"$ref": format!("#{fragment}")});
        for key in ["paths", "components"] {
            root[key] = self.document[key].clone();
        }
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .should_validate_formats(true)
            .build(&root)
            .unwrap_or_else(|e| panic!("the schema at {pointer} does not compile: {e}"));
        let validator = Arc::new(validator);
        validators.insert(pointer.to_string(), validator.clone());
        validator
    }
}

fn op_pointer(op: &Operation) -> String {
    format!(
        "/paths/{}/{}",
        op.template.replace('~', "~0").replace('/', "~1"),
        op.method.to_ascii_lowercase()
    )
}

fn error_shape(body: Option<&Value>) -> Vec<String> {
    match body {
        Some(body) if body["message"].is_string() => Vec::new(),
        _ => vec!["an error response without GitHub's `message`".into()],
    }
}

/// A parameter's string as the JSON value its schema describes.
fn typed_parameter(schema: &Value, value: &str) -> Value {
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if types.contains(&"integer")
        && let Ok(n) = value.parse::<i64>()
    {
        return json!(n);
    }
    if types.contains(&"boolean")
        && let Ok(b) = value.parse::<bool>()
    {
        return json!(b);
    }
    json!(value)
}

fn match_template(
    parts: &[String],
    segments: &[&str],
) -> Option<(usize, BTreeMap<String, String>)> {
    let mut params = BTreeMap::new();
    let mut literals = 0;
    for (i, part) in parts.iter().enumerate() {
        if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            if name == "path" && i + 1 == parts.len() {
                let rest = segments.get(i..)?.join("/");
                if rest.is_empty() {
                    return None;
                }
                params.insert(name.to_string(), percent_decode(&rest));
                return Some((literals, params));
            }
            let segment = segments.get(i)?;
            if segment.is_empty() {
                return None;
            }
            params.insert(name.to_string(), percent_decode(segment));
        } else if segments.get(i) == Some(&part.as_str()) {
            literals += 1;
        } else {
            return None;
        }
    }
    (parts.len() == segments.len()).then_some((literals, params))
}

/// Decodes `%XX` escapes (GitHub's clients escape `/` in refs and `...` never).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
