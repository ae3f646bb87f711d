//! Typed reading of [`XmlElement`]s: attributes as numbers, durations,
//! switches and choices, with one diagnostic per problem.
//!
//! Every reader method records what went wrong and returns a default, so one
//! parse reports every problem of a file. Macro references (`%NAME%`) in
//! attribute values are expanded here, before any typed conversion.

use std::str::FromStr;
use std::time::Duration;

use super::diagnostics::Origin;
use super::duration::{TimeUnit, parse_duration};
use super::xml::{SourceFile, XmlElement};

/// The state of one file's typed reading.
#[derive(Debug)]
pub(crate) struct Reader<'s, 'a> {
    pub(crate) source: &'s mut SourceFile<'a>,
    /// `<macro name value/>` definitions, in file order.
    pub(crate) macros: Vec<(String, String)>,
}

impl<'s, 'a> Reader<'s, 'a> {
    pub(crate) fn new(source: &'s mut SourceFile<'a>) -> Self {
        Reader {
            source,
            macros: Vec::new(),
        }
    }

    /// The element's position and its attributes' positions.
    pub(crate) fn origin(&self, element: &XmlElement) -> Origin {
        let (line, column) = self.source.line_column(element.offset);
        Origin {
            file: self.source.name.clone(),
            element: element.name.clone(),
            line,
            column,
            attributes: element
                .attrs
                .iter()
                .map(|attr| {
                    let (line, column) = self.source.line_column(attr.offset);
                    (attr.name.clone(), line, column)
                })
                .collect(),
        }
    }

    pub(crate) fn element_error(&mut self, element: &XmlElement, message: impl Into<String>) {
        self.source
            .error(element.offset, Some(&element.name), None, message);
    }

    pub(crate) fn attribute_error(
        &mut self,
        element: &XmlElement,
        attribute: &str,
        message: impl Into<String>,
    ) {
        let offset = element
            .attrs
            .iter()
            .find(|attr| attr.name == attribute)
            .map_or(element.offset, |attr| attr.offset);
        self.source
            .error(offset, Some(&element.name), Some(attribute), message);
    }

    /// Reports attributes and child elements that `element` may not have, and
    /// character data where none is expected.
    pub(crate) fn expect_shape(
        &mut self,
        element: &XmlElement,
        attributes: &[&str],
        children: &[&str],
        text_allowed: bool,
    ) {
        for attr in &element.attrs {
            if !attributes.contains(&attr.name.as_str()) {
                let expected = if attributes.is_empty() {
                    "this element has no attributes".to_owned()
                } else {
                    format!("expected one of: {}", attributes.join(", "))
                };
                self.source.error(
                    attr.offset,
                    Some(&element.name),
                    Some(&attr.name),
                    format!("unknown attribute `{}`: {expected}", attr.name),
                );
            }
        }
        for child in &element.children {
            if !children.contains(&child.name.as_str()) {
                let expected = if children.is_empty() {
                    format!("<{}> has no child elements", element.name)
                } else {
                    let names: Vec<String> =
                        children.iter().map(|name| format!("<{name}>")).collect();
                    format!("expected one of: {}", names.join(", "))
                };
                self.source.error(
                    child.offset,
                    Some(&child.name),
                    None,
                    format!(
                        "unknown element <{}> inside <{}>: {expected}",
                        child.name, element.name
                    ),
                );
            }
        }
        if !text_allowed
            && element
                .texts
                .iter()
                .any(|text| !text.text.trim().is_empty())
        {
            self.element_error(
                element,
                format!(
                    "<{}> holds no text: expected only child elements",
                    element.name
                ),
            );
        }
    }

    /// The one child named `name`, reporting any repetition.
    pub(crate) fn singleton<'e>(
        &mut self,
        element: &'e XmlElement,
        name: &str,
    ) -> Option<&'e XmlElement> {
        let mut found = element.children.iter().filter(|child| child.name == name);
        let first = found.next();
        for repeated in found {
            self.element_error(
                repeated,
                format!("<{name}> may appear only once inside <{}>", element.name),
            );
        }
        first
    }

    /// Every child named `name`.
    pub(crate) fn children<'e>(
        element: &'e XmlElement,
        name: &'e str,
    ) -> impl Iterator<Item = &'e XmlElement> + 'e {
        element
            .children
            .iter()
            .filter(move |child| child.name == name)
    }

    /// The attribute's value with macros expanded.
    pub(crate) fn string(&self, element: &XmlElement, name: &str) -> Option<String> {
        let attr = element.attrs.iter().find(|attr| attr.name == name)?;
        Some(expand_macros(&attr.value, &self.macros))
    }

    /// A required attribute; missing ones are reported.
    pub(crate) fn required(&mut self, element: &XmlElement, name: &str) -> Option<String> {
        let value = self.string(element, name);
        if value.is_none() && !element.malformed {
            self.element_error_attr(
                element,
                name,
                format!("missing required attribute `{name}`"),
            );
        }
        value
    }

    fn element_error_attr(&mut self, element: &XmlElement, attribute: &str, message: String) {
        self.source.error(
            element.offset,
            Some(&element.name),
            Some(attribute),
            message,
        );
    }

    /// A required attribute that must not be empty.
    pub(crate) fn required_nonempty(&mut self, element: &XmlElement, name: &str) -> String {
        match self.required(element, name) {
            Some(value) if value.trim().is_empty() => {
                self.attribute_error(element, name, "must not be empty");
                value
            }
            Some(value) => value,
            None => String::new(),
        }
    }

    pub(crate) fn duration(
        &mut self,
        element: &XmlElement,
        name: &str,
        unit: TimeUnit,
        zero_allowed: bool,
        default: Duration,
    ) -> Duration {
        self.opt_duration(element, name, unit, zero_allowed)
            .unwrap_or(default)
    }

    pub(crate) fn opt_duration(
        &mut self,
        element: &XmlElement,
        name: &str,
        unit: TimeUnit,
        zero_allowed: bool,
    ) -> Option<Duration> {
        let value = self.string(element, name)?;
        match parse_duration(&value, unit, zero_allowed) {
            Ok(duration) => Some(duration),
            Err(error) => {
                self.attribute_error(element, name, error.to_string());
                None
            }
        }
    }

    /// A switch written `on`/`off` (also accepted: `yes`/`no`, `true`/`false`).
    pub(crate) fn switch(&mut self, element: &XmlElement, name: &str, default: bool) -> bool {
        let Some(value) = self.string(element, name) else {
            return default;
        };
        match value.as_str() {
            "on" | "yes" | "true" => true,
            "off" | "no" | "false" => false,
            _ => {
                self.attribute_error(
                    element,
                    name,
                    format!("`{value}` is not a switch: expected on or off"),
                );
                default
            }
        }
    }

    pub(crate) fn number<T: FromStr>(
        &mut self,
        element: &XmlElement,
        name: &str,
        default: T,
        expected: &str,
    ) -> T {
        self.opt_number(element, name, expected).unwrap_or(default)
    }

    pub(crate) fn opt_number<T: FromStr>(
        &mut self,
        element: &XmlElement,
        name: &str,
        expected: &str,
    ) -> Option<T> {
        let value = self.string(element, name)?;
        match value.trim().parse() {
            Ok(number) => Some(number),
            Err(_) => {
                self.attribute_error(
                    element,
                    name,
                    format!("`{value}` is not valid: expected {expected}"),
                );
                None
            }
        }
    }

    pub(crate) fn choice<T: Copy>(
        &mut self,
        element: &XmlElement,
        name: &str,
        choices: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(value) = self.string(element, name) else {
            return default;
        };
        match choices.iter().find(|(text, _)| *text == value) {
            Some((_, choice)) => *choice,
            None => {
                let names: Vec<&str> = choices.iter().map(|(text, _)| *text).collect();
                self.attribute_error(
                    element,
                    name,
                    format!(
                        "`{value}` is not valid: expected one of: {}",
                        names.join(", ")
                    ),
                );
                default
            }
        }
    }
}

/// Replaces each `%NAME%` whose NAME is a defined macro by its value, in one
/// pass (a macro value is not expanded again). Other `%` are kept as written:
/// SafeKit also expands environment variables there, at run time.
pub fn expand_macros(value: &str, macros: &[(String, String)]) -> String {
    if macros.is_empty() || !value.contains('%') {
        return value.to_owned();
    }
    let mut expanded = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find('%') {
        expanded.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('%') {
            Some(end) => {
                let name = &after[..end];
                match macros.iter().find(|(macro_name, _)| macro_name == name) {
                    Some((_, macro_value)) => {
                        expanded.push_str(macro_value);
                        rest = &after[end + 1..];
                    }
                    None => {
                        expanded.push('%');
                        rest = after;
                    }
                }
            }
            None => {
                expanded.push('%');
                rest = after;
            }
        }
    }
    expanded.push_str(rest);
    expanded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macros_expand_once_and_leave_unknown_names() {
        let macros = vec![
            ("VIP".to_owned(), "10.0.0.9".to_owned()),
            ("X".to_owned(), "%VIP%".to_owned()),
        ];
        assert_eq!(expand_macros("%VIP%", &macros), "10.0.0.9");
        assert_eq!(expand_macros("a%VIP%b%VIP%", &macros), "a10.0.0.9b10.0.0.9");
        assert_eq!(expand_macros("%X%", &macros), "%VIP%");
        assert_eq!(
            expand_macros("%SAFE%\\bin %VIP%", &macros),
            "%SAFE%\\bin 10.0.0.9"
        );
        assert_eq!(expand_macros("100%", &macros), "100%");
    }
}
