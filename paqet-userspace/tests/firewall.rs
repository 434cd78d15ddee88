//! Root-only: `tools::firewall::apply` inserts the rules in a fresh namespace, leaves existing ones
//! alone and removes exactly what it added.
use paqet::tools::firewall::{apply, is_present, rules, FirewallRole};
use paqet_testkit::netns::{is_root, Netns};

#[test]
fn apply_and_remove_in_a_namespace() {
    if !is_root() {
        eprintln!("skipping: needs root (network namespace, iptables)");
        return;
    }
    let ns = Netns::new("fw").expect("namespace");
    let name = ns.name().to_owned();
    let result = ns.spawn(move || {
        let server = rules(&FirewallRole::Server {
            port: 9999,
            ipv4: true,
            ipv6: true,
        });
        let client = rules(&FirewallRole::Client {
            server: "10.200.0.2:9999".parse().unwrap(),
            local_ports: vec![40000],
        });
        // One client rule exists beforehand: apply must skip it and must not remove it.
        let pre = &client[0];
        let st = std::process::Command::new("iptables")
            .args(pre.args("-A"))
            .status()
            .unwrap();
        assert!(st.success());
        let mut all = server.clone();
        all.extend(client.iter().cloned());
        let mut guard = apply(&all).expect("apply");
        assert_eq!(
            guard.added().len(),
            all.len() - 1,
            "pre-existing rule skipped"
        );
        for r in &all {
            assert!(is_present(r).unwrap(), "missing after apply: {r}");
        }
        let raw = paqet_testkit::netns::run("iptables", &["-t", "raw", "-S"]).unwrap();
        assert!(
            raw.contains(
                "-A PREROUTING -p tcp -m tcp --dport 9999 -m comment --comment paqet-dp -j NOTRACK"
            ),
            "{raw}"
        );
        assert!(
            raw.contains(
                "-A PREROUTING -p tcp -m tcp --dport 9999 -m comment --comment paqet-dp -j DROP"
            ),
            "{raw}"
        );
        let raw6 = paqet_testkit::netns::run("ip6tables", &["-t", "raw", "-S"]).unwrap();
        assert!(
            raw6.contains("--sport 9999 -m comment --comment paqet-dp -j NOTRACK"),
            "{raw6}"
        );
        // Applying again adds nothing.
        let again = apply(&all).expect("apply again");
        assert!(again.added().is_empty());
        drop(again);
        guard.remove().expect("remove");
        for r in &all[..] {
            let want = std::ptr::eq(r, &all[server.len()]) || r == pre;
            assert_eq!(is_present(r).unwrap(), want, "after remove: {r}");
        }
        // Drop removes too.
        let g = apply(&server).expect("apply server rules");
        drop(g);
        let raw = paqet_testkit::netns::run("iptables", &["-t", "raw", "-S"]).unwrap();
        assert!(
            !raw.contains("--dport 9999 -m comment"),
            "rules left after drop:\n{raw}"
        );
        let mangle = paqet_testkit::netns::run("iptables", &["-t", "mangle", "-S"]).unwrap();
        assert!(
            !mangle.contains("paqet-dp"),
            "rules left after drop:\n{mangle}"
        );
    });
    result.join().expect("thread").expect("enter namespace");
    eprintln!("namespace {name} checked");
}
