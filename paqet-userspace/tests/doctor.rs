//! `paqet::doctor` against a veth inside a private network namespace (root only).
//!
//! The doctor runs on the test thread after it entered the namespace, so it must report that
//! namespace's view: the veth's real offloads/channels (cross-checked with `ethtool`), and the
//! per-namespace `net.core.somaxconn`. Then a sysctl and an offload are changed and the matching
//! findings must flip.

use paqet::doctor::{run, DoctorOptions, Report, Status};
use paqet_testkit::netns::{is_root, Netns, VethPair};

fn doctor(iface: &str) -> Report {
    run(&DoctorOptions {
        iface: Some(iface.to_owned()),
        pcap_sockbuf: None,
    })
}

/// Value of `key:` in `ethtool -k` output (`on`/`off`, without `[fixed]`).
fn ethtool_feature(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("{key} not in ethtool -k output:\n{text}"))
        .to_owned()
}

/// `(rx, tx)` of the "Current hardware settings" block of `ethtool -l`.
fn ethtool_current_channels(text: &str) -> (String, String) {
    let cur = text
        .split("Current hardware settings:")
        .nth(1)
        .unwrap_or_else(|| panic!("no current settings in:\n{text}"));
    let get = |k: &str| {
        cur.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{k}:")))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("{k} missing in:\n{text}"))
    };
    (get("RX"), get("TX"))
}

fn status_of(r: &Report, name: &str) -> (Status, String) {
    let f = r
        .get(name)
        .unwrap_or_else(|| panic!("finding {name} missing:\n{}", r.to_text()));
    (f.status, f.current.clone())
}

#[test]
fn doctor_reports_and_tracks_a_veth_in_a_namespace() {
    if !is_root() {
        eprintln!("SKIP doctor_reports_and_tracks_a_veth_in_a_namespace: needs root (ip netns, ethtool -K)");
        return;
    }
    let pid = std::process::id();
    let ns = Netns::new("doc").expect("netns");
    let peer = Netns::new("dop").expect("peer netns");
    let (a, b) = (format!("dva{pid}"), format!("dvb{pid}"));
    let veth = VethPair::new(&a, &b, &ns, &peer).expect("veth");
    let host_somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap();

    let guard = ns.enter().expect("enter netns");

    // 1. The report matches the veth's real settings.
    let r = doctor(&veth.a);
    assert_eq!(
        r.get("nic.driver").unwrap().current,
        "veth",
        "{}",
        r.to_text()
    );
    assert_eq!(r.get("nic.xdp").unwrap().status, Status::Ok);
    assert!(
        r.get("nic.interface").is_none(),
        "veth must be found inside the namespace:\n{}",
        r.to_text()
    );
    let k = ns.exec(&["ethtool", "-k", &veth.a]).unwrap();
    for (finding, key) in [
        ("nic.gro", "generic-receive-offload"),
        ("nic.lro", "large-receive-offload"),
        ("nic.tso", "tcp-segmentation-offload"),
    ] {
        assert_eq!(
            status_of(&r, finding).1,
            ethtool_feature(&k, key),
            "{finding} vs ethtool -k"
        );
    }
    let (rx, tx) = ethtool_current_channels(&ns.exec(&["ethtool", "-l", &veth.a]).unwrap());
    assert!(
        r.get("nic.channels")
            .unwrap()
            .current
            .starts_with(&format!("rx {rx} tx {tx} ")),
        "channels {:?} vs ethtool -l rx {rx} tx {tx}",
        r.get("nic.channels").unwrap().current
    );
    let ns_somaxconn = ns.exec(&["cat", "/proc/sys/net/core/somaxconn"]).unwrap();
    assert_eq!(
        status_of(&r, "sysctl.net.core.somaxconn").1,
        ns_somaxconn.trim()
    );
    // Host-global knobs are reported as such when the namespace does not show them.
    let backlog_visible = ns
        .exec(&["cat", "/proc/sys/net/core/netdev_max_backlog"])
        .is_ok();
    let backlog = r.get("sysctl.net.core.netdev_max_backlog").unwrap();
    assert_eq!(
        backlog.current != "not visible",
        backlog_visible,
        "{backlog:?}"
    );

    // 2. A per-namespace sysctl flips its finding (and leaves the host alone).
    ns.exec(&["sh", "-c", "echo 128 > /proc/sys/net/core/somaxconn"])
        .unwrap();
    let r = doctor(&veth.a);
    assert_eq!(
        status_of(&r, "sysctl.net.core.somaxconn"),
        (Status::Warn, "128".into())
    );
    assert!(r.exit_code() >= 1);
    ns.exec(&["sh", "-c", "echo 8192 > /proc/sys/net/core/somaxconn"])
        .unwrap();
    let r = doctor(&veth.a);
    assert_eq!(
        status_of(&r, "sysctl.net.core.somaxconn"),
        (Status::Ok, "8192".into())
    );

    // 3. An offload flips its finding, in step with ethtool.
    for (state, want) in [("on", Status::Warn), ("off", Status::Ok)] {
        ns.exec(&["ethtool", "-K", &veth.a, "gro", state]).unwrap();
        let r = doctor(&veth.a);
        let k = ns.exec(&["ethtool", "-k", &veth.a]).unwrap();
        assert_eq!(ethtool_feature(&k, "generic-receive-offload"), state);
        assert_eq!(
            status_of(&r, "nic.gro"),
            (want, state.to_owned()),
            "{}",
            r.to_text()
        );
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        let gro = json["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "nic.gro")
            .unwrap();
        assert_eq!(gro["current"], state);
        assert!(gro["fix"]
            .as_str()
            .unwrap()
            .contains(&format!("ethtool -K {} gro off", veth.a)));
    }

    drop(guard);
    // The host namespace kept its own somaxconn.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap(),
        host_somaxconn
    );
    // Back in the original namespace the veth is not visible.
    let r = doctor(&veth.a);
    assert_eq!(r.get("nic.interface").map(|f| f.status), Some(Status::Fail));
}
