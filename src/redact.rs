//! URLs as they may be shown: every URL that can reach a log, an error, `Debug` output or the API
//! goes through [`redact_url`] first, so that a broker's or a database's credentials never do.
//!
//! What counts as a secret: the userinfo of the authority (`user:password@` keeps the user,
//! a lone `token@`, as in NATS token auth, is all secret), and the value of any query parameter
//! whose key names one (`password`, `pass`, `secret`, `token`, `auth_token`, `sslpassword`, or
//! any key containing `password`, `secret` or `token`, in any case). The authority ends at the
//! first `/`, `?` or `#`, so an `@` in a path or a query is not userinfo. A text that is not a
//! URL with a scheme is not echoed at all: it may be a credential typed in the wrong place.

/// What stands in for a secret.
const HIDDEN: &str = "***";

/// `url` without its credentials: see the [module](self) documentation.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once(':').filter(|(s, _)| is_scheme(s)) else {
        return NOT_A_URL.to_owned();
    };
    let Some(rest) = rest.strip_prefix("//") else {
        // Opaque (`sqlite:data/x.db`): no authority, so an '@' can only be a credential in the
        // wrong place (`user:password@host` without its scheme reads as one).
        if rest.contains('@') {
            return NOT_A_URL.to_owned();
        }
        return format!("{scheme}:{}", redact_query(rest));
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = (&authority[..at], &authority[at + 1..]);
            match userinfo.split_once(':') {
                Some((user, _password)) => format!("{user}:{HIDDEN}@{host}"),
                None => format!("{HIDDEN}@{host}"),
            }
        }
        None => authority.to_owned(),
    };
    format!("{scheme}://{authority}{}", redact_query(tail))
}

/// What is shown for a text that is not a URL: it may be a credential typed in the wrong place.
const NOT_A_URL: &str = "*** (not a URL)";

/// RFC 3986: a letter, then letters, digits, `+`, `-` or `.`.
fn is_scheme(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// The path, query and fragment with the values of secret-looking query parameters hidden.
fn redact_query(tail: &str) -> String {
    let Some(q) = tail.find('?') else {
        return tail.to_owned();
    };
    let (path, rest) = tail.split_at(q + 1);
    let (query, fragment) = match rest.find('#') {
        Some(f) => rest.split_at(f),
        None => (rest, ""),
    };
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((key, _)) if is_secret(key) => format!("{key}={HIDDEN}"),
            _ => param.to_owned(),
        })
        .collect();
    format!("{path}{}{fragment}", params.join("&"))
}

fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key == "pass" || key.contains("password") || key.contains("secret") || key.contains("token")
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn credentials_never_survive() {
        let cases = [
            // Userinfo with a password: the user stays.
            (
                "postgres://admin:s3cretpass@127.0.0.1:1/db",
                "postgres://admin:***@127.0.0.1:1/db",
            ),
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            ("nats://u:p@h", "nats://u:***@h"),
            // A password holding '@' or ':' is hidden whole.
            ("nats://u:p@ss:w@h:4222", "nats://u:***@h:4222"),
            // User-only credentials are a token (NATS token auth).
            ("nats://s3crettoken@127.0.0.1:1", "nats://***@127.0.0.1:1"),
            // No credentials: unchanged.
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            ("sqlite://data/x.db", "sqlite://data/x.db"),
            ("sqlite:///tmp/a@b.db", "sqlite:///tmp/a@b.db"),
            // An '@' after the authority is not userinfo.
            ("http://h/path@x", "http://h/path@x"),
            ("http://h?to=a@b", "http://h?to=a@b"),
            ("http://h#frag@x", "http://h#frag@x"),
            // Secrets in the query.
            (
                "postgres://h/db?password=s3cret&sslmode=require",
                "postgres://h/db?password=***&sslmode=require",
            ),
            (
                "postgres://h/db?sslmode=require&sslpassword=s3cret",
                "postgres://h/db?sslmode=require&sslpassword=***",
            ),
            ("nats://h?token=s3cret", "nats://h?token=***"),
            ("nats://h?auth_token=s3cret#x", "nats://h?auth_token=***#x"),
            ("amqp://h/?pass=s3cret", "amqp://h/?pass=***"),
            ("x://h?DB_PASSWORD=s3cret", "x://h?DB_PASSWORD=***"),
            (
                "x://h?client_secret=s3cret&a=1",
                "x://h?client_secret=***&a=1",
            ),
            ("x://h?AccessToken=s3cret", "x://h?AccessToken=***"),
            // Both at once.
            (
                "postgres://u:p1@h/db?password=p2",
                "postgres://u:***@h/db?password=***",
            ),
            // Not URLs: never echoed when they could hold a credential.
            ("admin:s3cretpass@127.0.0.1", "*** (not a URL)"),
            ("s3cret@host", "*** (not a URL)"),
            ("://u:s3cret@h", "*** (not a URL)"),
            ("no spaces://u:s3cret@h", "*** (not a URL)"),
            ("s3cret", "*** (not a URL)"),
            ("data/thunderline.db", "*** (not a URL)"),
            ("", "*** (not a URL)"),
            // Opaque URLs: shown, unless they hold an '@'.
            ("sqlite:data/x.db", "sqlite:data/x.db"),
            (
                "sqlite:data/x.db?password=s3cret",
                "sqlite:data/x.db?password=***",
            ),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
            for secret in ["s3cret", "p1", "p2", "p@ss"] {
                assert!(!redact_url(url).contains(secret), "{url}");
            }
        }
    }
}
