//! vim25 SOAP framing: the request envelope, managed object references, and
//! reading a response into its body or a [`VimFault`].
//!
//! ```text
//! <soapenv:Envelope ...><soapenv:Body>
//!   <Login xmlns="urn:vim25"><_this type="SessionManager">ha-sessionmgr</_this>...</Login>
//! </soapenv:Body></soapenv:Envelope>
//!
//! answer:  <LoginResponse xmlns="urn:vim25"><returnval>...</returnval></LoginResponse>
//! or fault: <soapenv:Fault><faultcode/><faultstring>msg</faultstring>
//!             <detail><InvalidLoginFault xsi:type="InvalidLogin"/></detail></soapenv:Fault>
//! ```
//!
//! Element order inside a request follows the WSDL: ESXi's parser checks it.

use std::fmt::Write;

use super::xml::{escape, Element};

/// A managed object reference: `<x type="HostSystem">host-12</x>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MoRef {
    /// Managed object type, e.g. `VirtualMachine`.
    pub kind: String,
    /// Server-assigned id, e.g. `vm-42`.
    pub value: String,
}

impl MoRef {
    /// A reference from its type and id.
    pub fn new(kind: &str, value: &str) -> MoRef {
        MoRef {
            kind: kind.to_string(),
            value: value.to_string(),
        }
    }

    /// Reads a reference from an element carrying a `type` attribute.
    pub fn from_element(e: &Element) -> Option<MoRef> {
        let kind = e.attr("type")?;
        if e.text.is_empty() {
            return None;
        }
        Some(MoRef::new(kind, &e.text))
    }

    /// The reference as element `tag`.
    pub fn xml(&self, tag: &str) -> String {
        format!(
            "<{tag} type=\"{}\">{}</{tag}>",
            escape(&self.kind),
            escape(&self.value)
        )
    }
}

impl std::fmt::Display for MoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// A fault the server answered with (`MethodFault` and its subtypes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VimFault {
    /// Fault type without the `Fault` suffix, e.g. `InvalidLogin`, `NotFound`.
    pub kind: String,
    /// The server's message (`faultstring` or `localizedMessage`).
    pub message: String,
    /// The fault's own fields (e.g. `name` of `DuplicateName`), if any;
    /// boxed to keep results carrying a fault small.
    pub detail: Option<Box<Element>>,
}

impl VimFault {
    /// The text of field `name` of the fault detail.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.detail.as_ref()?.text_at(&[name])
    }

    /// Reads a `LocalizedMethodFault` (a task's `info.error`).
    pub fn from_localized(error: &Element) -> VimFault {
        let fault = error.child("fault");
        let kind = fault
            .and_then(|f| f.xsi_type())
            .unwrap_or("MethodFault")
            .to_string();
        let message = error
            .text_at(&["localizedMessage"])
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| kind.clone());
        VimFault {
            kind,
            message,
            detail: fault.cloned().map(Box::new),
        }
    }
}

impl std::fmt::Display for VimFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.message.is_empty() || self.message == self.kind {
            write!(f, "{}", self.kind)
        } else {
            write!(f, "{} ({})", self.message, self.kind)
        }
    }
}

/// What a response turned out to be.
#[derive(Debug)]
pub enum Response {
    /// The `<MethodResponse>` element.
    Body(Element),
    /// A SOAP fault.
    Fault(VimFault),
}

/// Wraps a request body (one method element) in a SOAP envelope.
pub fn envelope(method: &str, this: &MoRef, args: &str) -> String {
    let mut out = String::with_capacity(512 + args.len());
    out.push_str(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
         <soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" \
         xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"><soapenv:Body>",
    );
    let _ = write!(
        out,
        "<{method} xmlns=\"urn:vim25\">{}{args}</{method}>",
        this.xml("_this")
    );
    out.push_str("</soapenv:Body></soapenv:Envelope>");
    out
}

/// `<tag>text</tag>` with the text escaped.
pub fn field(tag: &str, text: &str) -> String {
    format!("<{tag}>{}</{tag}>", escape(text))
}

/// Reads a response document.
///
/// # Errors
/// A message when the document is not a SOAP envelope with a body.
pub fn parse_response(xml: &str) -> Result<Response, String> {
    let doc = Element::parse(xml)?;
    let body = doc
        .child("Body")
        .ok_or_else(|| format!("no SOAP body in {}", excerpt(xml)))?;
    let first = body
        .children
        .first()
        .ok_or_else(|| "empty SOAP body".to_string())?;
    if first.name == "Fault" {
        return Ok(Response::Fault(fault_from_soap(first)));
    }
    Ok(Response::Body(first.clone()))
}

fn fault_from_soap(fault: &Element) -> VimFault {
    let message = fault.text_at(&["faultstring"]).unwrap_or("").to_string();
    let detail = fault.child("detail").and_then(|d| d.children.first());
    let kind = detail
        .map(|d| {
            d.xsi_type()
                .map(str::to_string)
                .unwrap_or_else(|| d.name.trim_end_matches("Fault").to_string())
        })
        .unwrap_or_else(|| "SoapFault".to_string());
    VimFault {
        kind,
        message,
        detail: detail.cloned().map(Box::new),
    }
}

/// The first 200 characters of a document, for error messages.
pub fn excerpt(text: &str) -> String {
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vcsim's answer to a Login with a wrong password (captured).
    const INVALID_LOGIN: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>Login failure</faultstring><detail><InvalidLoginFault xmlns="urn:vim25" xsi:type="InvalidLogin"></InvalidLoginFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;

    /// A DuplicateName fault as ESXi sends it (shape from the WSDL: the
    /// fault's fields inside the detail element).
    const DUPLICATE_NAME: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>The name &apos;revive-a&apos; already exists.</faultstring><detail><DuplicateNameFault xmlns="urn:vim25" xsi:type="DuplicateName"><name>revive-a</name><object type="Datastore">10.0.0.9:/revive@ha-folder-datastore</object></DuplicateNameFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;

    /// A task's info.error (LocalizedMethodFault), with the schema-instance
    /// namespace under the odd prefix vcsim uses in property values.
    const TASK_ERROR: &str = r#"<error><fault xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="NotFound"></fault><localizedMessage>stat /x/web01.nvram: no such file or directory</localizedMessage></error>"#;

    #[test]
    fn faults_name_their_type_and_message() {
        let Response::Fault(f) = parse_response(INVALID_LOGIN).unwrap() else {
            panic!("not a fault")
        };
        assert_eq!(f.kind, "InvalidLogin");
        assert_eq!(f.message, "Login failure");

        let Response::Fault(f) = parse_response(DUPLICATE_NAME).unwrap() else {
            panic!("not a fault")
        };
        assert_eq!(f.kind, "DuplicateName");
        assert_eq!(f.field("name"), Some("revive-a"));
        assert_eq!(f.message, "The name 'revive-a' already exists.");
    }

    #[test]
    fn task_errors_read_as_faults() {
        let f = VimFault::from_localized(&Element::parse(TASK_ERROR).unwrap());
        assert_eq!(f.kind, "NotFound");
        assert!(f.message.contains("web01.nvram"), "{f}");
    }

    #[test]
    fn bodies_come_back_as_the_response_element() {
        let xml = r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><CreateNasDatastoreResponse xmlns="urn:vim25"><returnval type="Datastore">ds-1</returnval></CreateNasDatastoreResponse></soapenv:Body></soapenv:Envelope>"#;
        let Response::Body(b) = parse_response(xml).unwrap() else {
            panic!("not a body")
        };
        assert_eq!(b.name, "CreateNasDatastoreResponse");
        let r = MoRef::from_element(b.child("returnval").unwrap()).unwrap();
        assert_eq!(r, MoRef::new("Datastore", "ds-1"));
        assert!(parse_response("<html>502</html>").is_err());
    }

    #[test]
    fn envelopes_escape_arguments() {
        let e = envelope(
            "Login",
            &MoRef::new("SessionManager", "sm"),
            &field("password", "a<b&c"),
        );
        assert!(e.contains(
            "<_this type=\"SessionManager\">sm</_this><password>a&lt;b&amp;c</password>"
        ));
        let doc = Element::parse(&e).unwrap();
        assert_eq!(
            doc.path(&["Body", "Login", "password"]).unwrap().text,
            "a<b&c"
        );
    }
}
