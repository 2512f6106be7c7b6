//! A small element tree over quick-xml's event reader, for vim25 responses.
//!
//! Why a tree and not serde: vim25 answers are polymorphic (`xsi:type` on
//! property values, faults and task results), and the driver reads a handful
//! of fields out of each. Walking a tree by local names is shorter and more
//! forgiving (unknown fields, namespace prefixes) than a serde type per answer.

use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::Event;
use quick_xml::Reader;

/// One XML element: local name, attributes (qualified names as written),
/// child elements and the text directly inside it (trimmed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    /// Local name (prefix removed).
    pub name: String,
    /// Attributes as `(qualified name, value)`.
    pub attrs: Vec<(String, String)>,
    /// Child elements in document order.
    pub children: Vec<Element>,
    /// Text content, entities resolved, surrounding white space removed.
    pub text: String,
}

fn local(name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    match name.rsplit_once(':') {
        Some((_, local)) => local.to_string(),
        None => name.into_owned(),
    }
}

impl Element {
    /// Parses a document and returns its root element.
    ///
    /// # Errors
    /// A message when the text is not well-formed XML.
    pub fn parse(xml: &str) -> Result<Element, String> {
        let mut reader = Reader::from_str(xml);
        let mut stack: Vec<Element> = Vec::new();
        let mut root = None;
        loop {
            let event = reader
                .read_event()
                .map_err(|e| format!("at byte {}: {e}", reader.buffer_position()))?;
            let empty = matches!(event, Event::Empty(_));
            match event {
                Event::Start(start) | Event::Empty(start) => {
                    let mut element = Element {
                        name: local(start.name().as_ref()),
                        ..Element::default()
                    };
                    for attr in start.attributes() {
                        let attr = attr.map_err(|e| e.to_string())?;
                        let value = attr
                            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                            .map_err(|e| e.to_string())?;
                        element.attrs.push((
                            String::from_utf8_lossy(attr.key.as_ref()).into_owned(),
                            value.into_owned(),
                        ));
                    }
                    // An empty element closes at once; a start waits for its end.
                    if empty {
                        close(&mut stack, &mut root, element);
                    } else {
                        stack.push(element);
                    }
                }
                Event::End(_) => {
                    let element = stack.pop().ok_or("unbalanced end tag")?;
                    close(&mut stack, &mut root, element);
                }
                Event::Text(text) => {
                    if let Some(top) = stack.last_mut() {
                        top.text
                            .push_str(&text.xml10_content().map_err(|e| e.to_string())?);
                    }
                }
                Event::CData(data) => {
                    if let Some(top) = stack.last_mut() {
                        top.text
                            .push_str(&data.decode().map_err(|e| e.to_string())?);
                    }
                }
                Event::GeneralRef(reference) => {
                    if let Some(top) = stack.last_mut() {
                        if let Some(ch) = reference.resolve_char_ref().map_err(|e| e.to_string())? {
                            top.text.push(ch);
                        } else {
                            let name = reference.decode().map_err(|e| e.to_string())?;
                            let value = resolve_predefined_entity(&name)
                                .ok_or_else(|| format!("unknown entity &{name};"))?;
                            top.text.push_str(value);
                        }
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        if !stack.is_empty() {
            return Err("document ends inside an element".into());
        }
        root.ok_or_else(|| "no root element".into())
    }

    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child named `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// Follows child names from this element.
    pub fn path(&self, names: &[&str]) -> Option<&Element> {
        names.iter().try_fold(self, |e, name| e.child(name))
    }

    /// The text of the child at `names`, if present.
    pub fn text_at(&self, names: &[&str]) -> Option<&str> {
        self.path(names).map(|e| e.text.as_str())
    }

    /// The value of attribute `name` (qualified name as written).
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `xsi:type` of this element, whatever prefix the document bound
    /// to the schema-instance namespace.
    pub fn xsi_type(&self) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k.ends_with(":type"))
            .map(|(_, v)| v.rsplit(':').next().unwrap_or(v))
    }
}

fn close(stack: &mut [Element], root: &mut Option<Element>, mut element: Element) {
    element.text = element.text.trim().to_string();
    match stack.last_mut() {
        Some(parent) => parent.children.push(element),
        None => *root = Some(element),
    }
}

/// Escapes text for an element body or attribute value.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    quick_xml::escape::escape(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_attributes_text_and_entities() {
        let doc = Element::parse(
            r#"<?xml version="1.0"?><a:root xmlns:a="urn:x" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
                <val xsi:type="xsd:string">a &amp; b &#x41;</val><obj type="HostSystem">host-1</obj><e/></a:root>"#,
        )
        .unwrap();
        assert_eq!(doc.name, "root");
        let val = doc.child("val").unwrap();
        assert_eq!(val.text, "a & b A");
        assert_eq!(val.xsi_type(), Some("string"));
        let obj = doc.child("obj").unwrap();
        assert_eq!(obj.attr("type"), Some("HostSystem"));
        assert_eq!(obj.xsi_type(), None);
        assert_eq!(obj.text, "host-1");
        assert!(doc.child("e").is_some());
    }

    #[test]
    fn refuses_broken_documents() {
        assert!(Element::parse("<a><b></a>").is_err());
        assert!(Element::parse("<a>").is_err());
        assert!(Element::parse("").is_err());
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("<x & \"y\">"), "&lt;x &amp; &quot;y&quot;&gt;");
    }
}
