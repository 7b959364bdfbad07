//! `keelctl components …`: the component store. Uploads stream the file as the
//! request body, with a progress bar on stderr when it is a terminal.

use std::io::{IsTerminal, Read};
use std::path::Path;

use anyhow::Context;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::Ctx;
use crate::cli::{ComponentsCmd, UploadArgs};
use crate::output::{self, get};

/// Runs a `components` command.
pub async fn run(ctx: &Ctx, cmd: ComponentsCmd) -> anyhow::Result<()> {
    match cmd {
        ComponentsCmd::List { name } => {
            let v = match &name {
                Some(n) => ctx.client.get(&["components", n], &[]).await?,
                None => ctx.client.get(&["components"], &[]).await?,
            };
            if ctx.json {
                return output::json(&v);
            }
            print_packages(output::rows(&v))
        }
        ComponentsCmd::Upload(args) => upload(ctx, &args).await,
        ComponentsCmd::Delete { name, version } => {
            ctx.client
                .call(Method::DELETE, &["components", &name, "versions", &version], None)
                .await?;
            if !ctx.json {
                output::line(&format!("deleted version {version} of {name}"))?;
            }
            Ok(())
        }
    }
}

fn print_packages(packages: &[Value]) -> anyhow::Result<()> {
    let mut t = output::table(&["name", "version", "arch", "type", "size", "sha256", "created", "by"]);
    for p in packages {
        t.add_row(vec![
            get(p, "name"),
            get(p, "version"),
            get(p, "arch"),
            get(p, "type"),
            p["size"].as_i64().map_or_else(|| get(p, "size"), output::bytes),
            get(p, "sha256"),
            get(p, "created_at"),
            get(p, "created_by"),
        ]);
    }
    output::print(&t)
}

/// The SHA-256 of a file, in lowercase hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn progress_bar(len: u64, json: bool) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

async fn upload(ctx: &Ctx, args: &UploadArgs) -> anyhow::Result<()> {
    let path = &args.file;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    if !meta.is_file() {
        anyhow::bail!("{} is not a file", path.display());
    }
    // The server checks the upload against this hash, so a file that changes while
    // it is sent is refused rather than stored.
    let sha256 = sha256_file(path)?;
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;

    let bar = progress_bar(meta.len(), ctx.json);
    bar.set_message(format!("{} {}", args.name, args.version));
    let counter = bar.clone();
    let stream = tokio_util::io::ReaderStream::new(file).map(move |chunk| {
        if let Ok(c) = &chunk {
            counter.inc(c.len() as u64);
        }
        chunk
    });
    let mut query = vec![
        ("version", args.version.clone()),
        ("type", args.kind.as_str().to_owned()),
        ("arch", args.arch.as_str().to_owned()),
        ("sha256", sha256),
    ];
    if let Some(sig) = &args.signature {
        query.push(("signature", sig.clone()));
    }
    let result = ctx
        .client
        .upload(
            &["components", &args.name, "versions"],
            &query,
            reqwest::Body::wrap_stream(stream),
        )
        .await;
    bar.finish_and_clear();
    let v = result?;
    if ctx.json {
        return output::json(&v);
    }
    print_packages(std::slice::from_ref(&v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(sha256_file(&dir.path().join("missing")).is_err());
    }
}
