//! Reading one key against the key table ([`super::keys`]): its default for the role and the source
//! format, its bounds, and the error that names the key, the value and the table's allowed values. The
//! section functions in `build.rs` are made of these.

use std::fmt::Display;
use std::str::FromStr;

use super::keys::{flag_letters, info, Allowed, Def, KeyInfo, PORT_RANGE};
use super::raw::IntOrString;
use super::schema::{Issues, Mode};
use super::{HostPort, Limit, Role, TCP_FLAG_LETTERS};

/// Quotes a string value for messages the way TOML writes it.
pub(super) fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The "must be …" message for a key, from the table's allowed values.
pub(super) fn must(path: &str) -> String {
    let key = info(path);
    match key.allowed {
        Allowed::OneOf([only]) => format!("must be {}", q(only)),
        Allowed::OneOf(_) => format!("must be one of {}", key.allowed),
        other => format!("must be {other}"),
    }
}

/// The inclusive bounds of an integer key.
fn bounds(key: &KeyInfo) -> (i64, i64) {
    match key.allowed {
        Allowed::Int { lo, hi, .. } => (lo, hi),
        Allowed::FecShards { hi, .. } => (0, hi),
        Allowed::Limit(hi) => (1, hi),
        Allowed::Window(hi) => (1, hi),
        other => panic!("config key {} has no integer bounds ({other:?})", key.path),
    }
}

/// Validation state shared by the section functions.
pub(super) struct Ctx<'a> {
    pub(super) is: &'a mut Issues,
    pub(super) mode: Mode,
    pub(super) role: Option<Role>,
}

impl Ctx<'_> {
    pub(super) fn server(&self) -> bool {
        self.role == Some(Role::Server)
    }

    pub(super) fn client(&self) -> bool {
        self.role == Some(Role::Client)
    }

    /// The table default in effect for this source format.
    pub(super) fn def(&self, path: &str) -> &'static Def {
        info(path).def.for_format(self.mode == Mode::Lenient)
    }

    /// An integer default for this role; for a key whose default is a word (a window's `auto`), the
    /// integer it starts from (the other format's default).
    pub(super) fn def_int(&self, path: &str) -> i64 {
        let key = info(path);
        let role = self.role;
        key.def
            .for_format(self.mode == Mode::Lenient)
            .int(role)
            .or_else(|| key.def.for_format(self.mode == Mode::Strict).int(role))
            .unwrap_or_else(|| panic!("config key {path} has no integer default"))
    }

    pub(super) fn def_str(&self, path: &str) -> &'static str {
        match self.def(path) {
            Def::Str(s) => s,
            other => panic!("config key {path} has no string default ({other:?})"),
        }
    }

    pub(super) fn def_bool(&self, path: &str) -> bool {
        match self.def(path) {
            Def::Bool(b) => *b,
            other => panic!("config key {path} has no boolean default ({other:?})"),
        }
    }

    /// The default of an enum key, parsed.
    pub(super) fn def_choice<T: FromStr>(&self, path: &str) -> T {
        match self.def_str(path).parse() {
            Ok(t) => t,
            Err(_) => panic!("config key {path}: default is not an allowed value"),
        }
    }

    /// An integer key: unset → default; out of range → error and the default.
    pub(super) fn int(&mut self, path: &str, v: Option<i64>) -> i64 {
        let (lo, hi) = bounds(info(path));
        match v {
            None => self.def_int(path),
            Some(x) if (lo..=hi).contains(&x) => x,
            Some(x) => {
                self.is.error(path, Some(x.to_string()), must(path));
                self.def_int(path)
            }
        }
    }

    /// A limit key: -1 = unlimited, else 1..=hi (unset or out of range: the default, which may be -1).
    pub(super) fn limit(&mut self, path: &str, v: Option<i64>) -> Limit {
        match v {
            Some(-1) => None,
            v => match self.int(path, v) {
                -1 => None,
                n => Some(n as u32),
            },
        }
    }

    /// A KCP window key: an integer in range is a fixed window, `"auto"` an auto-tuned one starting at the
    /// table's integer default. Unset = that default, auto-tuned when the table's default for this format
    /// is `auto` (TOML) and fixed otherwise (imported YAML keeps upstream's window). Returns
    /// `(window, auto)`.
    pub(super) fn window(&mut self, path: &str, v: Option<&IntOrString>) -> (u32, bool) {
        let (lo, hi) = bounds(info(path));
        let start = self.def_int(path) as u32;
        let unset_auto = *self.def(path) == Def::Str("auto");
        match v {
            None => (start, unset_auto),
            Some(IntOrString::Int(x)) if (lo..=hi).contains(x) => (*x as u32, false),
            Some(IntOrString::Str(s)) if s == "auto" => (start, true),
            Some(other) => {
                self.is.error(path, Some(other.to_string()), must(path));
                (start, unset_auto)
            }
        }
    }

    /// An enum key; `disp` is the displayed path (array index included), `path` the table's. A bad value
    /// is reported with the table's list (or the parser's own explanation for free-form values).
    pub(super) fn choice<T>(&mut self, disp: &str, path: &str, v: Option<&String>) -> Option<T>
    where
        T: FromStr,
        T::Err: Display,
    {
        let s = v?;
        match s.parse() {
            Ok(t) => Some(t),
            Err(e) => {
                let msg = match info(path).allowed {
                    Allowed::OneOf(_) => must(path),
                    _ => e.to_string(),
                };
                self.is.error(disp, Some(q(s)), msg);
                None
            }
        }
    }

    /// An enum key with a default.
    pub(super) fn choice_or_default<T>(&mut self, path: &str, v: Option<&String>) -> T
    where
        T: FromStr,
        T::Err: Display,
    {
        self.choice(path, path, v)
            .unwrap_or_else(|| self.def_choice(path))
    }

    /// A required enum key.
    pub(super) fn required_choice<T>(
        &mut self,
        disp: &str,
        path: &str,
        v: Option<&String>,
    ) -> Option<T>
    where
        T: FromStr,
        T::Err: Display,
    {
        if v.is_none() {
            self.is
                .error(disp, None, format!("required: {}", must(path)));
        }
        self.choice(disp, path, v)
    }

    /// A string that must be one of the table's words; unset → the default (if any).
    pub(super) fn word(&mut self, path: &str, v: Option<&String>) -> Option<String> {
        let Allowed::OneOf(words) = info(path).allowed else {
            panic!("config key {path} is not a list of words");
        };
        match v {
            None => match self.def(path) {
                Def::Str(s) => Some(s.to_string()),
                _ => None,
            },
            Some(s) if words.contains(&s.as_str()) => Some(s.clone()),
            Some(s) => {
                self.is.error(path, Some(q(s)), must(path));
                None
            }
        }
    }

    /// A `host:port` with port 1..=65535; `disp` is the displayed path (array index included).
    pub(super) fn endpoint(
        &mut self,
        disp: &str,
        v: Option<&String>,
        required: bool,
    ) -> Option<HostPort> {
        let Some(s) = v else {
            if required {
                self.is.error(disp, None, "required (host:port)");
            }
            return None;
        };
        match HostPort::parse(s) {
            Ok(hp) if hp.port != 0 => Some(hp),
            Ok(_) => {
                self.is
                    .error(disp, Some(q(s)), format!("port must be {PORT_RANGE}"));
                None
            }
            Err(e) => {
                self.is.error(
                    disp,
                    Some(q(s)),
                    format!("{e}; expected host:port with port {PORT_RANGE}"),
                );
                None
            }
        }
    }

    /// Reports a key set for the wrong role: error in TOML, ignored with a warning in imported YAML.
    pub(super) fn wrong_role(&mut self, path: &str, only: Role) {
        let role = self.role.unwrap_or(Role::Client);
        let msg = match self.mode {
            Mode::Strict => format!("only valid for role {only} (this config is role {role})"),
            Mode::Lenient => {
                format!("ignored: only used by role {only} (this config is role {role})")
            }
        };
        self.is.strict(self.mode, path, None, msg);
    }

    /// `network.tcp.*_flag`: unset or empty → the default list.
    pub(super) fn flags(&mut self, path: &str, v: Option<&Vec<String>>) -> Vec<String> {
        let default = match self.def(path) {
            Def::List(items) => items.iter().map(|s| s.to_string()).collect(),
            other => panic!("config key {path} has no list default ({other:?})"),
        };
        let Allowed::Flags { max } = info(path).allowed else {
            panic!("config key {path} is not a flag list");
        };
        let Some(list) = v else { return default };
        if list.is_empty() {
            return default;
        }
        if list.len() > max {
            self.is
                .error(path, Some(format!("[…{} entries]", list.len())), must(path));
            return default;
        }
        let mut ok = true;
        for (i, entry) in list.iter().enumerate() {
            let disp = format!("{path}[{i}]");
            if entry.is_empty() {
                self.is.error(
                    disp,
                    Some(q(entry)),
                    format!("empty flag string; use letters {}", flag_letters()),
                );
                ok = false;
            } else if let Some(bad) = entry.chars().find(|c| !TCP_FLAG_LETTERS.contains(*c)) {
                self.is.error(
                    disp,
                    Some(q(entry)),
                    format!(
                        "{bad:?} is not a TCP flag letter; allowed {}",
                        flag_letters()
                    ),
                );
                ok = false;
            }
        }
        if ok {
            list.clone()
        } else {
            default
        }
    }
}
