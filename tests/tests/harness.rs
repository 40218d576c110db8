//! The harness itself: test data, tree comparison, waiting, Mosquitto and the MQTT client.
//! These run without the coordinator or the agent.

use std::os::unix::fs::{symlink, PermissionsExt as _};
use std::time::Duration;

use anyhow::Result;
use system_tests::{
    change_tree, copy_tree, tree_diff, wait_until, write_tree, Mosquitto, TestClient,
};

#[test]
fn write_tree_is_deterministic_and_has_every_kind_of_entry() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    write_tree(&a, 7, 1_000_000)?;
    write_tree(&b, 7, 1_000_000)?;
    write_tree(&c, 8, 1_000_000)?;
    assert_eq!(tree_diff(&a, &b)?, Vec::<String>::new());
    assert!(
        !tree_diff(&a, &c)?.is_empty(),
        "another seed gives the same tree"
    );

    let mode =
        |p: &str| -> Result<u32> { Ok(std::fs::metadata(a.join(p))?.permissions().mode() & 0o777) };
    assert_eq!(mode("bin/start.sh")?, 0o755);
    assert_eq!(mode("conf/secret.key")?, 0o600);
    assert_eq!(std::fs::metadata(a.join("conf/empty"))?.len(), 0);
    assert_eq!(
        std::fs::read_link(a.join("app.conf"))?,
        std::path::Path::new("conf/app.conf")
    );
    assert_eq!(
        std::fs::read(a.join("bin/config"))?,
        std::fs::read(a.join("conf/app.conf"))?
    );
    let total: u64 = walk_sizes(&a)?;
    assert!(
        (1_000_000..1_010_000).contains(&total),
        "tree has {total} bytes"
    );
    Ok(())
}

#[test]
fn tree_diff_sees_contents_modes_symlink_targets_and_extra_entries() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_tree(&a, 1, 300_000)?;
    copy_tree(&a, &b)?;
    assert_eq!(tree_diff(&a, &b)?, Vec::<String>::new());

    std::fs::write(b.join("conf/empty"), b"x")?;
    std::fs::set_permissions(
        b.join("bin/start.sh"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    std::fs::remove_file(b.join("app.conf"))?;
    symlink("bin/start.sh", b.join("app.conf"))?;
    std::fs::write(b.join("extra"), b"")?;
    let diffs = tree_diff(&a, &b)?;
    for what in ["conf/empty", "bin/start.sh", "app.conf", "extra"] {
        assert!(
            diffs.iter().any(|d| d.contains(what)),
            "{what} not in {diffs:#?}"
        );
    }
    Ok(())
}

#[test]
fn change_tree_makes_a_few_changes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_tree(&a, 1, 2_000_000)?;
    copy_tree(&a, &b)?;
    change_tree(&b, 2)?;
    let diffs = tree_diff(&a, &b)?;
    assert!((5..=8).contains(&diffs.len()), "{diffs:#?}");
    Ok(())
}

#[test]
fn wait_until_says_what_it_waited_for_and_the_last_failure() {
    let err = wait_until(Duration::from_millis(300), "the moon to turn blue", || {
        anyhow::bail!("it is grey")
    })
    .expect_err("the moon stays grey");
    let text = format!("{err:#}");
    assert!(
        text.contains("the moon to turn blue") && text.contains("it is grey"),
        "{text}"
    );
}

#[test]
fn mosquitto_keeps_retained_messages_until_it_is_killed_and_comes_back_on_the_same_port(
) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut broker = Mosquitto::start(tmp.path())?;
    let mut client = TestClient::connect(broker.addr())?;
    client.publish("fleet/test/retained", b"hello".to_vec(), true)?;
    wait_until(Duration::from_secs(5), "the retained message", || {
        Ok(TestClient::connect(broker.addr())?
            .retained("fleet/test/retained")?
            .as_deref()
            == Some(&b"hello"[..]))
    })?;

    let addr = broker.addr();
    broker.kill();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "a killed broker still listens"
    );
    broker.restart()?;
    assert_eq!(broker.addr(), addr);
    let mut fresh = TestClient::connect(addr)?;
    assert_eq!(
        fresh.retained("fleet/test/retained")?,
        None,
        "no persistence"
    );
    Ok(())
}

fn walk_sizes(dir: &std::path::Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            total += walk_sizes(&entry.path())?;
        } else if kind.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}
