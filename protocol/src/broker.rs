//! The broker address both binaries accept from operators: `mqtt://HOST[:PORT]`.
//! Parsing only; connecting is the caller's business.

/// The standard MQTT port, used when the URL names none.
pub const DEFAULT_MQTT_PORT: u16 = 1883;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid broker URL {value:?}: {why}; use mqtt://HOST:PORT")]
pub struct BrokerAddrError {
    pub value: String,
    pub why: &'static str,
}

impl BrokerAddr {
    pub fn parse(value: &str) -> Result<BrokerAddr, BrokerAddrError> {
        let bad = |why| BrokerAddrError {
            value: value.to_owned(),
            why,
        };
        let rest = value
            .strip_prefix("mqtt://")
            .ok_or_else(|| bad("unsupported scheme (only plain mqtt:// is supported)"))?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '@', '?', '#']) {
            return Err(bad("expected only a host and a port after mqtt://"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed [ in an IPv6 address"))?;
            let port = match after.strip_prefix(':') {
                Some(port) => Some(port),
                None if after.is_empty() => None,
                None => return Err(bad("unexpected text after the IPv6 address")),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        let port = match port {
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("port is not a number from 1 to 65535"))?,
            None => DEFAULT_MQTT_PORT,
        };
        Ok(BrokerAddr {
            host: host.to_owned(),
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(host: &str, port: u16) -> BrokerAddr {
        BrokerAddr {
            host: host.to_owned(),
            port,
        }
    }

    #[test]
    fn broker_urls_parse_to_host_and_port() {
        assert_eq!(
            BrokerAddr::parse("mqtt://127.0.0.1:18831"),
            Ok(addr("127.0.0.1", 18831))
        );
        assert_eq!(
            BrokerAddr::parse("mqtt://broker.lan"),
            Ok(addr("broker.lan", 1883))
        );
        assert_eq!(
            BrokerAddr::parse("mqtt://[::1]:1884/"),
            Ok(addr("::1", 1884))
        );
        for bad in [
            "mqtts://h:1",
            "h:1883",
            "mqtt://",
            "mqtt://:1",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://u@h:1",
            "mqtt://h:1/t",
        ] {
            assert!(BrokerAddr::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
