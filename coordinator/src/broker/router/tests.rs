use super::*;

fn delivered(router: &mut Router, id: &ConnectionId) -> Vec<(String, Vec<u8>, QoS, bool, u16)> {
    let mut out = Vec::new();
    loop {
        match router.next_work(id, 1000) {
            Work::Send(batch) => {
                for item in batch {
                    if let Outgoing::Deliver { message, pkid, .. } = item {
                        out.push((
                            message.topic.to_string(),
                            message.payload.to_vec(),
                            message.qos,
                            message.retain,
                            pkid,
                        ));
                    }
                }
            }
            Work::Wait(_) | Work::Closed => return out,
        }
    }
}

/// Publishes a retained QoS 1 message.
fn retain(router: &mut Router, topic: &str, payload: &'static [u8]) {
    router.publish(topic, Bytes::from_static(payload), QoS::AtLeastOnce, true);
}

fn subscribed(
    router: &mut Router,
    client: &str,
    clean: bool,
    filter: &str,
    qos: QoS,
) -> ConnectionId {
    let id = router.connect(client, clean).id;
    router.subscribe(&id, 1, &[(filter.to_owned(), qos)]);
    id
}

#[test]
fn a_message_reaches_exact_and_wildcard_subscribers_once_each_at_the_lower_qos() {
    let mut router = Router::default();
    let node = subscribed(
        &mut router,
        "node-1",
        true,
        "fleet/node-1/cmd",
        QoS::AtLeastOnce,
    );
    let coordinator = subscribed(&mut router, "coord", true, "fleet/+/cmd", QoS::AtMostOnce);
    // A second, overlapping filter: still one copy, at the higher of the two grants.
    router.subscribe(&coordinator, 2, &[("fleet/#".to_owned(), QoS::AtLeastOnce)]);
    let other = subscribed(
        &mut router,
        "node-2",
        true,
        "fleet/node-2/cmd",
        QoS::AtLeastOnce,
    );

    router.publish(
        "fleet/node-1/cmd",
        Bytes::from_static(b"go"),
        QoS::AtLeastOnce,
        false,
    );

    let to_node = delivered(&mut router, &node);
    assert_eq!(to_node.len(), 1);
    assert_eq!(to_node[0].0, "fleet/node-1/cmd");
    assert_eq!(to_node[0].2, QoS::AtLeastOnce);
    assert!(!to_node[0].3, "a live message is not marked retained");
    assert_ne!(to_node[0].4, 0, "QoS 1 gets a packet id");
    let to_coordinator = delivered(&mut router, &coordinator);
    assert_eq!(to_coordinator.len(), 1);
    assert_eq!(to_coordinator[0].2, QoS::AtLeastOnce);
    assert!(delivered(&mut router, &other).is_empty());
}

#[test]
fn a_retained_message_is_sent_to_later_subscribers_marked_retained_and_an_empty_one_deletes_it() {
    let mut router = Router::default();
    retain(&mut router, "fleet/n/state", b"v1");
    retain(&mut router, "fleet/n/state", b"v2");
    let late = subscribed(&mut router, "late", true, "fleet/+/state", QoS::AtMostOnce);
    let got = delivered(&mut router, &late);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, b"v2");
    assert!(got[0].3, "sent from the store: marked retained");
    assert_eq!(got[0].2, QoS::AtMostOnce, "at the subscription's QoS");

    router.publish("fleet/n/state", Bytes::new(), QoS::AtLeastOnce, true);
    assert_eq!(router.retained_count(), 0);
    let later = subscribed(&mut router, "later", true, "fleet/#", QoS::AtLeastOnce);
    assert!(delivered(&mut router, &later).is_empty());
}

#[test]
fn a_retained_payload_is_a_copy_of_its_own() {
    let mut router = Router::default();
    let read_buffer = Bytes::from(vec![1u8; 4096]);
    router.publish("t", read_buffer.slice(0..2), QoS::AtMostOnce, true);
    let stored = &router
        .retained
        .values()
        .next()
        .expect("retained")
        .message(QoS::AtMostOnce)
        .payload;
    assert_eq!(stored.as_ref(), &[1, 1]);
    assert!(
        !std::ptr::eq(stored.as_ptr(), read_buffer.as_ptr()),
        "the store would keep the whole read buffer alive"
    );
}

#[test]
fn a_large_retained_payload_kept_compressed_reaches_a_late_subscriber_whole() {
    let mut router = Router::default();
    // Like the manifest a command embeds: JSON of hex digests, which compresses well.
    let payload: Vec<u8> = (0..2_000u32)
        .flat_map(|i| {
            format!("{{\"digest\":\"{:064x}\"}},", u64::from(i) * 0x9e37_79b9).into_bytes()
        })
        .collect();
    router.publish(
        "fleet/nodes/n/in/command",
        Bytes::from(payload.clone()),
        QoS::AtLeastOnce,
        true,
    );
    assert!(
        router.retained.values().next().expect("retained").held() < payload.len() / 2,
        "kept compressed"
    );
    let late = subscribed(
        &mut router,
        "n",
        true,
        "fleet/nodes/n/in/command",
        QoS::AtLeastOnce,
    );
    let got = delivered(&mut router, &late);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, payload);
    assert_eq!((got[0].2, got[0].3), (QoS::AtLeastOnce, true));
}

#[test]
fn unacknowledged_qos1_messages_are_sent_again_marked_dup_when_a_persistent_session_returns() {
    let mut router = Router::default();
    let first = subscribed(&mut router, "node", false, "inbox", QoS::AtLeastOnce);
    router.publish("inbox", Bytes::from_static(b"a"), QoS::AtLeastOnce, false);
    router.publish("inbox", Bytes::from_static(b"b"), QoS::AtLeastOnce, false);
    let sent = delivered(&mut router, &first);
    assert_eq!(sent.len(), 2);
    router.acknowledge(&first, sent[0].4);
    assert!(
        router.disconnect(&first),
        "it owned the session: its will is due"
    );

    // Sent while the node is away: QoS 1 waits for it, QoS 0 does not.
    router.publish("inbox", Bytes::from_static(b"c"), QoS::AtLeastOnce, false);
    router.publish("inbox", Bytes::from_static(b"d"), QoS::AtMostOnce, false);

    let back = router.connect("node", false);
    assert!(back.session_present);
    let Work::Send(batch) = router.next_work(&back.id, 1000) else {
        panic!("work expected");
    };
    let sent: Vec<(Vec<u8>, bool)> = batch
        .into_iter()
        .filter_map(|item| match item {
            Outgoing::Deliver { message, dup, .. } => Some((message.payload.to_vec(), dup)),
            Outgoing::Reply(_) => None,
        })
        .collect();
    assert_eq!(sent, vec![(b"b".to_vec(), true), (b"c".to_vec(), false)]);
}

#[test]
fn a_clean_session_is_forgotten_with_its_subscriptions() {
    let mut router = Router::default();
    let first = subscribed(&mut router, "c", true, "t", QoS::AtLeastOnce);
    router.disconnect(&first);
    let again = router.connect("c", true);
    assert!(!again.session_present);
    router.publish("t", Bytes::from_static(b"x"), QoS::AtLeastOnce, false);
    assert!(delivered(&mut router, &again.id).is_empty());
    assert!(router.exact.is_empty(), "no subscriber table left behind");
}

#[test]
fn a_new_connection_takes_the_session_over_and_the_old_one_is_closed_without_its_will() {
    let mut router = Router::default();
    let old = subscribed(&mut router, "node", false, "inbox", QoS::AtLeastOnce);
    let new = router.connect("node", false).id;
    assert!(matches!(router.next_work(&old, 10), Work::Closed));
    assert!(
        !router.disconnect(&old),
        "the old connection no longer owns it"
    );
    router.publish("inbox", Bytes::from_static(b"x"), QoS::AtLeastOnce, false);
    assert_eq!(
        delivered(&mut router, &new).len(),
        1,
        "subscriptions carried over"
    );
}

#[test]
fn a_full_queue_drops_new_messages_for_that_session_only() {
    let mut router = Router::default();
    let stuck = subscribed(&mut router, "stuck", true, "t", QoS::AtMostOnce);
    let fine = subscribed(&mut router, "fine", true, "t", QoS::AtMostOnce);
    for _ in 0..MAX_QUEUED_MESSAGES + 5 {
        router.publish("t", Bytes::from_static(b"m"), QoS::AtMostOnce, false);
        // `fine` keeps up; `stuck` never reads.
        delivered(&mut router, &fine);
    }
    assert_eq!(router.dropped("stuck"), 5);
    assert_eq!(router.dropped("fine"), 0);
    assert_eq!(delivered(&mut router, &stuck).len(), MAX_QUEUED_MESSAGES);
}

#[test]
fn queued_bytes_are_bounded_and_given_back_as_messages_leave() {
    let mut router = Router::default();
    let id = subscribed(&mut router, "c", true, "t", QoS::AtLeastOnce);
    let big = Bytes::from(vec![0u8; MAX_QUEUED_BYTES / 4]);
    for _ in 0..5 {
        router.publish("t", big.clone(), QoS::AtLeastOnce, false);
    }
    assert_eq!(router.dropped("c"), 1, "the fifth did not fit");
    let sent = delivered(&mut router, &id);
    assert_eq!(sent.len(), 4);
    // Still in flight: still counted.
    router.publish("t", big.clone(), QoS::AtLeastOnce, false);
    assert_eq!(router.dropped("c"), 2);
    for (.., pkid) in &sent {
        router.acknowledge(&id, *pkid);
    }
    router.publish("t", big, QoS::AtLeastOnce, false);
    assert_eq!(router.dropped("c"), 2, "acknowledged bytes were given back");
}

#[test]
fn no_more_than_the_window_of_qos1_messages_is_in_flight() {
    let mut router = Router::default();
    let id = subscribed(&mut router, "c", true, "t", QoS::AtLeastOnce);
    for _ in 0..MAX_INFLIGHT + 3 {
        router.publish("t", Bytes::from_static(b"m"), QoS::AtLeastOnce, false);
    }
    let first = delivered(&mut router, &id);
    assert_eq!(first.len(), MAX_INFLIGHT);
    router.acknowledge(&id, first[0].4);
    assert_eq!(delivered(&mut router, &id).len(), 1);
}

#[test]
fn an_invalid_filter_is_refused_in_the_suback_and_the_others_granted_at_most_qos1() {
    let mut router = Router::default();
    let id = router.connect("c", true).id;
    router.subscribe(
        &id,
        7,
        &[
            ("a/#/b".to_owned(), QoS::AtLeastOnce),
            ("a/+".to_owned(), QoS::ExactlyOnce),
        ],
    );
    let Work::Send(batch) = router.next_work(&id, 10) else {
        panic!("a SUBACK is due");
    };
    let Some(Outgoing::Reply(Packet::SubAck(ack))) = batch.into_iter().next() else {
        panic!("a SUBACK is due");
    };
    assert_eq!(ack.pkid, 7);
    assert_eq!(
        ack.return_codes,
        vec![
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        ]
    );
}

#[test]
fn unsubscribing_stops_delivery() {
    let mut router = Router::default();
    let id = subscribed(&mut router, "c", true, "a/+", QoS::AtLeastOnce);
    router.unsubscribe(&id, 3, &["a/+".to_owned()]);
    router.publish("a/b", Bytes::from_static(b"x"), QoS::AtLeastOnce, false);
    assert!(delivered(&mut router, &id).is_empty());
    assert!(router.wildcard.is_empty());
}

#[test]
fn a_session_whose_client_is_away_keeps_only_a_bounded_backlog() {
    let mut router = Router::default();
    let id = subscribed(&mut router, "gone", false, "inbox", QoS::AtLeastOnce);
    router.disconnect(&id);
    for _ in 0..MAX_QUEUED_WHILE_AWAY + 10 {
        router.publish("inbox", Bytes::from_static(b"cmd"), QoS::AtLeastOnce, false);
    }
    assert_eq!(router.dropped("gone"), 10);
    let back = router.connect("gone", false).id;
    let mut total = 0;
    loop {
        let sent = delivered(&mut router, &back);
        if sent.is_empty() {
            break;
        }
        total += sent.len();
        for (.., pkid) in sent {
            router.acknowledge(&back, pkid);
        }
    }
    assert_eq!(total, MAX_QUEUED_WHILE_AWAY);
}

#[test]
fn an_exact_filter_gets_its_topic_s_retained_message_and_no_other() {
    let mut router = Router::default();
    retain(&mut router, "fleet/a/cmd", b"a");
    retain(&mut router, "fleet/b/cmd", b"b");
    let alone = subscribed(&mut router, "alone", true, "fleet/a/cmd", QoS::AtMostOnce);
    let got = delivered(&mut router, &alone);
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.as_str(), got[0].1.as_slice(), got[0].2, got[0].3),
        ("fleet/a/cmd", &b"a"[..], QoS::AtMostOnce, true)
    );
}

#[test]
fn overlapping_exact_and_wildcard_filters_get_one_retained_copy_at_the_higher_grant() {
    let mut router = Router::default();
    retain(&mut router, "fleet/a/cmd", b"a");
    retain(&mut router, "fleet/b/cmd", b"b");
    let id = router.connect("a", true).id;
    router.subscribe(
        &id,
        1,
        &[
            ("fleet/a/cmd".to_owned(), QoS::AtMostOnce),
            ("fleet/+/cmd".to_owned(), QoS::AtLeastOnce),
        ],
    );
    let mut got = delivered(&mut router, &id);
    got.sort_by(|x, y| x.0.cmp(&y.0));
    // One copy per topic although two filters match fleet/a/cmd, at the higher grant.
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0].0.as_str(), got[0].2),
        ("fleet/a/cmd", QoS::AtLeastOnce)
    );
    assert_eq!(got[1].0, "fleet/b/cmd");
}
