//! The end-to-end tests' harness, shared by every crate's tests: free loopback ports, the test
//! models, a `neuron` command, processes killed on drop, and a real Kubernetes control plane:
//! etcd and kube-apiserver (RBAC on) started on free loopback ports from the binaries
//! `scripts/envtest-assets` provides (it honours `KUBEBUILDER_ASSETS`), a kubeconfig for an
//! administrator, and (with the `kube` feature) a `kube::Client`. Everything is torn down when the
//! [`ControlPlane`] is dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root (where `scripts/` lives).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit sits in the workspace")
        .to_path_buf()
}

/// The directory holding kube-apiserver, etcd, kubectl and helm, from `scripts/envtest-assets`.
/// Fails loudly, naming the command, when they cannot be had.
pub fn assets() -> PathBuf {
    static ASSETS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ASSETS
        .get_or_init(|| {
            let script = workspace_root().join("scripts/envtest-assets");
            let out = Command::new(&script)
                .stderr(Stdio::inherit())
                .output()
                .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
            assert!(
                out.status.success(),
                "scripts/envtest-assets failed; run it by hand to see why (it builds kube-apiserver \
                 and fetches etcd, kubectl and helm into ~/.cache/cortex/envtest)"
            );
            let dir = String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .map(|l| PathBuf::from(l.trim()))
                .expect("scripts/envtest-assets printed no directory");
            for t in ["kube-apiserver", "etcd", "kubectl", "helm"] {
                assert!(
                    dir.join(t).is_file(),
                    "{t} is missing from {}; run scripts/envtest-assets",
                    dir.display()
                );
            }
            dir
        })
        .clone()
}

/// `CORTEX_CACHE`, else `~/.cache/cortex`: where the scripts put models, tools and environments.
pub fn cache_dir() -> PathBuf {
    std::env::var("CORTEX_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/cortex"))
}

/// The test models' directory; fails naming the script that fetches them when one is missing.
pub fn models_dir() -> PathBuf {
    let d = cache_dir().join("models");
    for f in [
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gemma-3-270m-Q4_K_M.gguf",
    ] {
        assert!(
            d.join(f).is_file(),
            "test model {f} is missing; run scripts/fetch-test-models first"
        );
    }
    d
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `neuron` command (the binary at `bin`) listening on loopback `port`, on the CPU, allowed to
/// read the test models' directory, with quiet logs and stdout: add flags, then spawn it.
pub fn neuron(bin: &Path, port: u16) -> Command {
    let mut c = Command::new(bin);
    c.args(["--listen", &format!("127.0.0.1:{port}"), "--device", "cpu"])
        .args([
            "--model-dirs",
            &cache_dir().join("models").display().to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    c
}

/// A child process killed (and reaped) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// etcd + kube-apiserver on loopback, and an administrator's kubeconfig.
pub struct ControlPlane {
    // Dropped in this order: the API server before etcd, then the files.
    apiserver: Proc,
    _etcd: Proc,
    pub url: String,
    pub kubeconfig: PathBuf,
    /// Bearer token of the administrator (group system:masters).
    pub token: String,
    dir: tempfile::TempDir,
}

const TOKEN: &str = "cortex-test-admin-token";

impl ControlPlane {
    /// Starts etcd and kube-apiserver and waits until the API server is ready.
    pub async fn start() -> ControlPlane {
        let assets = assets();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let log = |name: &str| std::fs::File::create(d.join(name)).unwrap();

        let (client_port, peer_port) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = Proc(
            Command::new(assets.join("etcd"))
                .args(["--name", "default"])
                .args(["--data-dir", &d.join("etcd").display().to_string()])
                .args(["--listen-client-urls", &etcd_url])
                .args(["--advertise-client-urls", &etcd_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("default={peer_url}")])
                .args(["--unsafe-no-fsync=true"])
                .stdout(log("etcd.log"))
                .stderr(log("etcd.err"))
                .spawn()
                .expect("starting etcd"),
        );

        let sa_key = d.join("sa.key");
        let st = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&sa_key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .expect("openssl (Debian package openssl) is needed to make the service-account key");
        assert!(st.success(), "openssl genrsa failed");
        std::fs::write(
            d.join("tokens.csv"),
            format!("{TOKEN},admin,admin-uid,\"system:masters\"\n"),
        )
        .unwrap();

        let port = free_port();
        let mut apiserver = None;
        for attempt in 0..3 {
            let port = if attempt == 0 { port } else { free_port() };
            let mut child = Command::new(assets.join("kube-apiserver"))
                .args(["--etcd-servers", &etcd_url])
                .args(["--cert-dir", &d.join("certs").display().to_string()])
                .args(["--secure-port", &port.to_string()])
                .args(["--bind-address", "127.0.0.1"])
                .args(["--advertise-address", "127.0.0.1"])
                .args(["--service-cluster-ip-range", "10.0.0.0/24"])
                .args(["--authorization-mode", "RBAC"])
                .args([
                    "--token-auth-file",
                    &d.join("tokens.csv").display().to_string(),
                ])
                .args(["--service-account-key-file", &sa_key.display().to_string()])
                .args([
                    "--service-account-signing-key-file",
                    &sa_key.display().to_string(),
                ])
                .args(["--service-account-issuer", "https://kubernetes.default.svc"])
                .args(["--disable-admission-plugins", "ServiceAccount"])
                .arg("--allow-privileged=true")
                .stdout(log("kube-apiserver.log"))
                .stderr(log("kube-apiserver.err"))
                .spawn()
                .expect("starting kube-apiserver");
            let url = format!("https://127.0.0.1:{port}");
            if wait_ready(&url, &mut child).await {
                apiserver = Some((Proc(child), url));
                break;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let Some((apiserver, url)) = apiserver else {
            let err = std::fs::read_to_string(d.join("kube-apiserver.err")).unwrap_or_default();
            let tail: String = err.lines().rev().take(30).collect::<Vec<_>>().join("\n");
            panic!(
                "kube-apiserver did not become ready; the end of its log, newest first:\n{tail}"
            );
        };
        let kubeconfig = d.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    insecure-skip-tls-verify: true\nusers:\n- name: admin\n  user:\n    token: {TOKEN}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n    namespace: default\ncurrent-context: test\n"
            ),
        )
        .unwrap();
        let cp = ControlPlane {
            apiserver,
            _etcd: etcd,
            url,
            kubeconfig,
            token: TOKEN.into(),
            dir,
        };
        cp.wait_for_default_namespace().await;
        cp
    }

    /// A client for the administrator.
    #[cfg(feature = "kube")]
    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(cfg).unwrap()
    }

    /// `kubectl` against this control plane, as the administrator.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(assets().join("kubectl"));
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }

    /// Runs kubectl with `args`; panics with its output unless it succeeds; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl().args(args).output().expect("running kubectl");
        assert!(
            out.status.success(),
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Directory for logs and files of this control plane (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    async fn wait_for_default_namespace(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self
                .kubectl()
                .args(["get", "namespace", "default", "-o", "name"])
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the default namespace did not appear: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.apiserver.0.kill();
        let _ = self.apiserver.0.wait();
    }
}

/// Waits (up to 90 s) for `/readyz` to answer 200; false when the process exits first.
async fn wait_ready(url: &str, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        let out = Command::new("curl")
            .args(["-ksf", "-o", "/dev/null", "-H"])
            .arg(format!("Authorization: Bearer {TOKEN}"))
            .arg(format!("{url}/readyz"))
            .status();
        if out.is_ok_and(|s| s.success()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}
