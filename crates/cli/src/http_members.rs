//! The members part of the agent's HTTP API: the JSON of a member, and
//! `GET /v1/members/watch` (membership changes as server-sent events). See `docs/http-api.md`.

use std::convert::Infallible;

use axum::extract::{RawQuery, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};

use chorus::{LeaveReason, MemberEvent, MemberEventKind, MemberInfo, Node};

use crate::http::{ApiError, parse_query};

/// The JSON of one member, as `/v1/members` lists it.
pub fn member_json(m: &MemberInfo) -> Value {
    json!({
        "node_id": m.node_id.0,
        "name": m.name,
        "incarnation": m.incarnation,
        "addr": m.addr.to_string(),
        "state": m.state.as_str(),
        "clock_offset_ms": m.clock_offset_ms,
    })
}

/// The JSON of one membership change, as `/v1/members/watch` sends it.
pub fn member_event_json(e: &MemberEvent) -> Value {
    let mut obj = json!({
        "event": e.kind.as_str(),
        "node_id": e.node_id.0,
        "name": e.name,
        "incarnation": e.incarnation,
        "addr": e.addr.to_string(),
    });
    match e.kind {
        MemberEventKind::Left(reason) => {
            obj["reason"] = Value::from(match reason {
                LeaveReason::Goodbye => "goodbye",
                LeaveReason::Timeout => "timeout",
            });
        }
        MemberEventKind::Restarted { previous } => {
            obj["previous_incarnation"] = Value::from(previous);
        }
        _ => {}
    }
    obj
}

/// A Prometheus label value: `\`, `"` and line breaks escaped (names are printable, but the
/// exposition format needs these three escaped whatever the text).
pub fn label_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `GET /v1/members/watch`: first one `members` event with the current list (the answer of
/// `/v1/members`), then one event per change, its type the change's name (`joined`,
/// `suspected`, `alive`, `left`, `restarted`) and its data the change as JSON. A client
/// that reads too slowly gets a `lagged` event with the number of changes it missed (then
/// the stream goes on). It ends when the agent stops.
pub async fn watch_members(
    State(node): State<Node>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    parse_query(q.as_deref(), &[])?;
    // Subscribe before taking the list, so no change falls between the two.
    let events = node.member_events();
    let members: Vec<Value> = node.members().iter().map(member_json).collect();
    let snapshot = json!({
        "node_id": node.node_id().0,
        "node_name": node.node_name(),
        "members": members,
    });
    let opening = futures_util::stream::once(async move {
        Ok::<_, Infallible>(Event::default().event("members").data(snapshot.to_string()))
    });
    let changes = events.map(|event| {
        Ok(match event {
            Ok(e) => Event::default()
                .event(e.kind.as_str())
                .data(member_event_json(&e).to_string()),
            Err(chorus::Error::Lagged { skipped: missed }) => Event::default()
                .event("lagged")
                .data(json!({ "missed": missed }).to_string()),
            Err(e) => Event::default()
                .event("error")
                .data(json!({ "error": e.to_string() }).to_string()),
        })
    });
    Ok(Sse::new(opening.chain(changes))
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("web-1"), "web-1");
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn a_left_event_names_its_reason_and_a_restart_its_previous_life() {
        let addr = "10.0.0.2:7400".parse().expect("address");
        let left = MemberEvent {
            kind: MemberEventKind::Left(LeaveReason::Timeout),
            node_id: chorus::NodeId(2),
            incarnation: 5,
            name: Some("b".into()),
            addr,
        };
        let json = member_event_json(&left);
        assert_eq!(json["event"], "left");
        assert_eq!(json["reason"], "timeout");
        assert_eq!(json["name"], "b");
        assert_eq!(json["addr"], "10.0.0.2:7400");
        let restarted = MemberEvent {
            kind: MemberEventKind::Restarted { previous: 5 },
            incarnation: 9,
            name: None,
            ..left
        };
        let json = member_event_json(&restarted);
        assert_eq!(
            (
                json["previous_incarnation"].as_u64(),
                json["incarnation"].as_u64()
            ),
            (Some(5), Some(9))
        );
        assert!(json["name"].is_null());
    }
}
