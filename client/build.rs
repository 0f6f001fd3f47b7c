//! Compiles `src/consumer/binhdrs.c` (the consumer's allocation-free read of
//! a record's header bytes) against the librdkafka sources rdkafka-sys built
//! from, when it built them: rdkafka-sys publishes that directory as
//! `DEP_RDKAFKA_ROOT`. Linked against a system librdkafka instead, there are
//! no internal headers to compile against, and the consumer falls back to
//! librdkafka's public header parse (`cfg(flotilla_binhdrs)` unset); setting
//! `FLOTILLA_NO_BINHDRS` forces that fallback.

use std::path::PathBuf;

fn main() {
    println!("cargo:rustc-check-cfg=cfg(flotilla_binhdrs)");
    println!("cargo:rerun-if-changed=src/consumer/binhdrs.c");
    println!("cargo:rerun-if-env-changed=DEP_RDKAFKA_ROOT");
    // Builds (and tests) the fallback on librdkafka's parse.
    println!("cargo:rerun-if-env-changed=FLOTILLA_NO_BINHDRS");
    if std::env::var_os("FLOTILLA_NO_BINHDRS").is_some() {
        return;
    }
    let Some(root) = std::env::var_os("DEP_RDKAFKA_ROOT").map(PathBuf::from) else {
        return;
    };
    let src = root.join("src");
    if !src.join("rdkafka_msg.h").is_file() || !root.join("config.h").is_file() {
        return;
    }
    cc::Build::new()
        .file("src/consumer/binhdrs.c")
        .include(&src)
        .include(&root)
        .warnings(false)
        .compile("flotilla_binhdrs");
    println!("cargo:rustc-cfg=flotilla_binhdrs");
}
