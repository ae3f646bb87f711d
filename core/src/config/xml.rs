//! A small element tree read from configuration XML, with source positions.
//!
//! quick-xml's streaming reader does the tokenising; this module turns its
//! events into [`XmlElement`]s that remember where each element and attribute
//! starts, so that the typed readers can point at the exact place of a problem.
//! Attributes are scanned here rather than by quick-xml so that every
//! malformed attribute is reported with its own position and a precise
//! message (notably values written in typographic quotes, as in one of the
//! SafeKit samples), and so that one bad attribute does not hide the others.

use std::sync::Arc;

use quick_xml::events::Event;
use quick_xml::{Reader, XmlVersion};

use super::diagnostics::{Diagnostic, LineIndex, Severity};

/// One attribute as written in the file, its value unescaped.
#[derive(Clone, Debug)]
pub(crate) struct XmlAttr {
    pub(crate) name: String,
    pub(crate) value: String,
    /// Byte offset of the attribute name.
    pub(crate) offset: usize,
}

/// A run of character data inside an element.
#[derive(Clone, Debug)]
pub(crate) struct XmlText {
    pub(crate) cdata: bool,
    pub(crate) text: String,
}

/// One element with its attributes, children and character data.
#[derive(Clone, Debug)]
pub(crate) struct XmlElement {
    pub(crate) name: String,
    /// Byte offset of the element's `<`.
    pub(crate) offset: usize,
    pub(crate) attrs: Vec<XmlAttr>,
    pub(crate) children: Vec<XmlElement>,
    pub(crate) texts: Vec<XmlText>,
    /// An attribute could not be read; missing attributes are then not reported
    /// again, since the real problem was already reported.
    pub(crate) malformed: bool,
}

/// Shared state of one file's parse: its name, line index and diagnostics.
#[derive(Debug)]
pub(crate) struct SourceFile<'a> {
    pub(crate) name: Arc<str>,
    pub(crate) index: LineIndex<'a>,
    pub(crate) diagnostics: Vec<Diagnostic>,
}

impl<'a> SourceFile<'a> {
    pub(crate) fn new(name: &str, text: &'a str) -> Self {
        SourceFile {
            name: name.into(),
            index: LineIndex::new(text),
            diagnostics: Vec::new(),
        }
    }

    /// Records a diagnostic at a byte offset.
    pub(crate) fn report(
        &mut self,
        severity: Severity,
        offset: usize,
        element: Option<&str>,
        attribute: Option<&str>,
        message: impl Into<String>,
    ) {
        let (line, column) = self.index.line_column(offset);
        self.diagnostics.push(Diagnostic {
            severity,
            file: self.name.clone(),
            line,
            column,
            element: element.map(str::to_owned),
            attribute: attribute.map(str::to_owned),
            message: message.into(),
        });
    }

    pub(crate) fn error(
        &mut self,
        offset: usize,
        element: Option<&str>,
        attribute: Option<&str>,
        message: impl Into<String>,
    ) {
        self.report(Severity::Error, offset, element, attribute, message);
    }

    pub(crate) fn line_column(&self, offset: usize) -> (u32, u32) {
        self.index.line_column(offset)
    }
}

/// The name of the document's first element, if the text has one; used to
/// tell a `userconfig.xml` (`safe`) from a `cluster.xml` (`cluster`).
pub fn root_element_name(text: &str) -> Option<String> {
    let mut reader = Reader::from_str(text);
    loop {
        match reader.read_event() {
            Ok(Event::Start(element) | Event::Empty(element)) => {
                return Some(element.name().as_ref().to_owned());
            }
            Ok(Event::Eof) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Parses `text` into its root element, recording syntax errors in `source`.
///
/// Returns `None` when the document has no usable root element. XML syntax
/// errors stop the parse (the tokeniser cannot resynchronise reliably), but
/// attribute errors do not.
pub(crate) fn parse_document(source: &mut SourceFile<'_>, text: &str) -> Option<XmlElement> {
    let mut reader = Reader::from_str(text);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<XmlElement> = Vec::new();
    let mut root: Option<XmlElement> = None;
    let mut text_continues = false;
    loop {
        let event_start = usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX);
        let event = match reader.read_event() {
            Ok(event) => event,
            Err(error) => {
                let offset = usize::try_from(reader.error_position()).unwrap_or(usize::MAX);
                source.error(offset, None, None, format!("malformed XML: {error}"));
                return None;
            }
        };
        let is_text = matches!(event, Event::Text(_) | Event::GeneralRef(_));
        match event {
            Event::Start(start) => {
                let content: &str = &start;
                let element =
                    read_element(source, text, content, event_start, start.name().as_ref());
                stack.push(element);
            }
            Event::Empty(start) => {
                let content: &str = &start;
                let element =
                    read_element(source, text, content, event_start, start.name().as_ref());
                attach(source, &mut stack, &mut root, element);
            }
            Event::End(_) => {
                // quick-xml checks that end names match their start tags.
                if let Some(element) = stack.pop() {
                    attach(source, &mut stack, &mut root, element);
                }
            }
            Event::Text(content) => {
                let content = content.xml_content(XmlVersion::Implicit1_0);
                push_text(source, &mut stack, event_start, &content, text_continues);
            }
            Event::GeneralRef(reference) => {
                let resolved = match reference.resolve_char_ref() {
                    Ok(Some(character)) => Some(character.to_string()),
                    Ok(None) => {
                        quick_xml::escape::resolve_predefined_entity(&reference).map(str::to_owned)
                    }
                    Err(_) => None,
                };
                match resolved {
                    Some(resolved) => {
                        push_text(source, &mut stack, event_start, &resolved, text_continues)
                    }
                    None => {
                        let name: &str = &reference;
                        source.error(
                            event_start,
                            stack.last().map(|element| element.name.as_str()),
                            None,
                            format!("unknown entity `&{name};`: expected &amp; &lt; &gt; &quot; &apos; or a character reference"),
                        );
                    }
                }
            }
            Event::CData(content) => match stack.last_mut() {
                Some(element) => element.texts.push(XmlText {
                    cdata: true,
                    text: content.to_string(),
                }),
                None => source.error(event_start, None, None, "CDATA outside of the root element"),
            },
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
            Event::Eof => break,
        }
        text_continues = is_text;
    }
    for element in stack.iter().rev() {
        source.error(
            element.offset,
            Some(&element.name),
            None,
            format!(
                "element <{}> is not closed: expected </{}>",
                element.name, element.name
            ),
        );
    }
    if root.is_none() && stack.is_empty() {
        source.error(text.len(), None, None, "no root element found");
    }
    if !stack.is_empty() {
        return None;
    }
    root
}

fn attach(
    source: &mut SourceFile<'_>,
    stack: &mut [XmlElement],
    root: &mut Option<XmlElement>,
    element: XmlElement,
) {
    if let Some(parent) = stack.last_mut() {
        parent.children.push(element);
    } else if root.is_none() {
        *root = Some(element);
    } else {
        source.error(
            element.offset,
            Some(&element.name),
            None,
            "a second root element: a configuration file has exactly one root element",
        );
    }
}

fn push_text(
    source: &mut SourceFile<'_>,
    stack: &mut [XmlElement],
    offset: usize,
    text: &str,
    text_continues: bool,
) {
    match stack.last_mut() {
        Some(element) => match element.texts.last_mut() {
            Some(last) if text_continues && !last.cdata => last.text.push_str(text),
            _ => element.texts.push(XmlText {
                cdata: false,
                text: text.to_owned(),
            }),
        },
        None if text.trim().is_empty() => {}
        None => source.error(offset, None, None, "text outside of the root element"),
    }
}

/// Builds an element from the content of a start tag (between `<` and `>`).
fn read_element(
    source: &mut SourceFile<'_>,
    text: &str,
    content: &str,
    event_start: usize,
    name: &str,
) -> XmlElement {
    let name = name.to_owned();
    // The content borrows from `text` (the reader was built from a &str), so its
    // offset is the pointer difference; fall back to just after `<` otherwise.
    let content_offset = (content.as_ptr() as usize)
        .checked_sub(text.as_ptr() as usize)
        .filter(|offset| offset + content.len() <= text.len())
        .unwrap_or(event_start + 1);
    let offset = content_offset.saturating_sub(1);
    let name_len = name.len().min(content.len());
    let mut element = XmlElement {
        name,
        offset,
        attrs: Vec::new(),
        children: Vec::new(),
        texts: Vec::new(),
        malformed: false,
    };
    let raw = content.get(name_len..).unwrap_or("");
    // An empty-element tag's content keeps its trailing `/`.
    let raw = raw.strip_suffix('/').unwrap_or(raw);
    scan_attributes(source, &mut element, raw, content_offset + name_len);
    element
}

const TYPOGRAPHIC_QUOTES: [(char, &str); 8] = [
    ('\u{201C}', "left double quotation mark"),
    ('\u{201D}', "right double quotation mark"),
    ('\u{201E}', "double low-9 quotation mark"),
    ('\u{2018}', "left single quotation mark"),
    ('\u{2019}', "right single quotation mark"),
    ('\u{201A}', "single low-9 quotation mark"),
    ('\u{00AB}', "left-pointing double angle quotation mark"),
    ('\u{00BB}', "right-pointing double angle quotation mark"),
];

/// Reads `name="value"` pairs from `raw`, which starts at byte `raw_offset`.
fn scan_attributes(
    source: &mut SourceFile<'_>,
    element: &mut XmlElement,
    raw: &str,
    raw_offset: usize,
) {
    let mut chars = raw.char_indices().peekable();
    let element_name = element.name.clone();
    let element_name = Some(element_name.as_str());
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(name_start, first)) = chars.peek() else {
            return;
        };
        let mut name_end = name_start;
        while let Some((idx, c)) =
            chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=' && *c != '"' && *c != '\'')
        {
            name_end = idx + c.len_utf8();
        }
        let name = &raw[name_start..name_end];
        if name.is_empty() {
            element.malformed = true;
            source.error(
                raw_offset + name_start,
                element_name,
                None,
                format!("unexpected `{first}`: expected an attribute name"),
            );
            return;
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            element.malformed = true;
            source.error(
                raw_offset + name_start,
                element_name,
                Some(name),
                format!("expected `=` and a quoted value after the attribute name: {name}=\"...\""),
            );
            return;
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some((quote_idx, quote)) = chars.next() else {
            element.malformed = true;
            source.error(
                raw_offset + name_end,
                element_name,
                Some(name),
                "expected a quoted value after `=`",
            );
            return;
        };
        if quote != '"' && quote != '\'' {
            element.malformed = true;
            let message = match TYPOGRAPHIC_QUOTES.iter().find(|(c, _)| *c == quote) {
                Some((c, what)) => format!(
                    "attribute values must be in straight quotes \" or ', found the typographic quote {c} (U+{:04X}, {what})",
                    u32::from(*c)
                ),
                None => {
                    format!("attribute values must be in straight quotes \" or ', found `{quote}`")
                }
            };
            source.error(raw_offset + quote_idx, element_name, Some(name), message);
            return;
        }
        let value_start = quote_idx + 1;
        let Some(value_len) = raw[value_start..].find(quote) else {
            element.malformed = true;
            source.error(
                raw_offset + quote_idx,
                element_name,
                Some(name),
                format!("the value is not closed: expected a closing {quote}"),
            );
            return;
        };
        let raw_value = &raw[value_start..value_start + value_len];
        // Skip the value and its closing quote.
        while chars
            .next_if(|(idx, _)| *idx <= value_start + value_len)
            .is_some()
        {}
        let value = match quick_xml::escape::unescape(raw_value) {
            Ok(value) => value.into_owned(),
            Err(error) => {
                element.malformed = true;
                source.error(
                    raw_offset + value_start,
                    element_name,
                    Some(name),
                    format!("bad character or entity reference: {error}"),
                );
                raw_value.to_owned()
            }
        };
        if value.contains('<') && raw_value.contains('<') {
            source.error(
                raw_offset + value_start,
                element_name,
                Some(name),
                "`<` is not allowed in an attribute value: write &lt;",
            );
        }
        if element.attrs.iter().any(|attr| attr.name == name) {
            source.error(
                raw_offset + name_start,
                element_name,
                Some(name),
                "attribute given twice",
            );
            continue;
        }
        element.attrs.push(XmlAttr {
            name: name.to_owned(),
            value,
            offset: raw_offset + name_start,
        });
        if let Some(&(_, next)) = chars.peek()
            && !next.is_whitespace()
        {
            element.malformed = true;
            source.error(
                raw_offset + value_start + value_len + 1,
                element_name,
                None,
                format!("unexpected `{next}` after the value of {name}: expected a space before the next attribute"),
            );
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Option<XmlElement>, Vec<String>) {
        let mut source = SourceFile::new("t.xml", text);
        let root = parse_document(&mut source, text);
        (
            root,
            source.diagnostics.iter().map(ToString::to_string).collect(),
        )
    }

    #[test]
    fn elements_attributes_and_text_keep_positions() {
        let (root, diagnostics) = parse(
            "<!DOCTYPE safe>\n<safe>\n  <a x=\"1 &amp; 2\" y='z'/>\n  <b><![CDATA[r: if (x) then y;]]>t &lt; u</b>\n</safe>\n",
        );
        assert_eq!(diagnostics, Vec::<String>::new());
        let root = root.expect("root");
        assert_eq!(root.name, "safe");
        let a = &root.children[0];
        assert_eq!(a.name, "a");
        assert_eq!(a.attrs[0].value, "1 & 2");
        assert_eq!(a.attrs[1].value, "z");
        let b = &root.children[1];
        assert_eq!(b.texts.len(), 2);
        assert!(b.texts[0].cdata);
        assert_eq!(b.texts[0].text, "r: if (x) then y;");
        assert_eq!(b.texts[1].text, "t < u");
    }

    #[test]
    fn typographic_quotes_are_reported_at_the_quote() {
        let (_, diagnostics) = parse("<safe>\n<heartbeat name=”default” ident=”flow”/>\n</safe>");
        assert_eq!(
            diagnostics,
            vec![
                "t.xml:2:17: element <heartbeat> attribute name: attribute values must be in straight quotes \" or ', found the typographic quote ” (U+201D, right double quotation mark)"
            ]
        );
    }

    #[test]
    fn syntax_errors_and_duplicates_are_reported() {
        let (_, diagnostics) = parse("<safe><a x=\"1\" x=\"2\"/><b y=\"1\"z=\"2\"/></safe>");
        assert_eq!(diagnostics.len(), 2, "{diagnostics:?}");
        assert!(diagnostics[0].contains("attribute x: attribute given twice"));
        assert!(diagnostics[1].contains("expected a space"));
        let (root, diagnostics) = parse("<safe><a></safe>");
        assert!(root.is_none());
        assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
        let (root, diagnostics) = parse("");
        assert!(root.is_none());
        assert_eq!(diagnostics, vec!["t.xml:1:1: no root element found"]);
    }

    #[test]
    fn root_element_name_finds_the_first_element() {
        assert_eq!(
            root_element_name("<?xml version=\"1.0\"?><!-- c --><cluster/>").as_deref(),
            Some("cluster")
        );
        assert_eq!(root_element_name("no xml"), None);
    }
}
