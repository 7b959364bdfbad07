//! A complete Keel plugin: it says hello on start, answers every task with a
//! record echoing the task's data and a 5100 result, logs through the agent, and
//! flushes everything when the agent stops it.
//!
//! Try it by hand in debug mode (tasks in and records out as JSON lines):
//!
//! ```sh
//! echo '{"data_type":20001,"data":"hi","token":"t1"}' | KEEL_PLUGIN_DEBUG=1 cargo run -p keel-plugin-sdk --example echo
//! ```

use std::process::ExitCode;

use keel_plugin_sdk::{Client, Error};

/// This plugin's data types, from the range Keel leaves to third-party plugins
/// (`keel_plugin_sdk::data_type::THIRD_PARTY`).
const HELLO: i32 = 20_000;
const ECHO: i32 = 20_001;

fn main() -> ExitCode {
    keel_plugin_sdk::run("echo", tracing::Level::INFO, echo)
}

fn echo(client: Client, detail: &str) -> Result<(), Error> {
    client.send(HELLO, [("detail", detail), ("pid", &std::process::id().to_string())])?;
    tracing::info!("echo plugin started");
    // Until the agent stops the plugin; everything buffered is flushed then.
    client.serve(|task| {
        client.send(
            ECHO,
            [("data", task.data.as_str()), ("object_name", task.object_name.as_str())],
        )?;
        client.task_result(&task.token, true, "echoed")
    })
}
