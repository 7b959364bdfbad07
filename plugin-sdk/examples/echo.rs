//! A complete Keel plugin: it answers every task with a record echoing the task's
//! data and a 5100 result, logs through the agent, and says hello on start.
//!
//! Try it by hand in debug mode:
//!
//! ```sh
//! echo '{"data_type":6900,"data":"hi","token":"t1"}' | KEEL_PLUGIN_DEBUG=1 cargo run -p keel-plugin-sdk --example echo
//! ```

use keel_plugin_sdk::{Client, Error, detail, logging};

/// This example's data types (a real plugin owns a range in the data_type table).
const HELLO: i32 = 6900;
const ECHO: i32 = 6901;

fn main() -> Result<(), Error> {
    // First in main: it also blocks SIGTERM for the SDK's stop handling.
    let client = Client::new()?;
    logging::init(&client, tracing::Level::INFO);
    let detail = detail().unwrap_or_default();
    client.send(
        HELLO,
        [("detail", detail.as_str()), ("pid", &std::process::id().to_string())],
    )?;
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
