//! Device errors that a machine without a GPU can check.
use duo_attn::{Context, Error};
use duo_attn_tests::notice;

#[test]
fn opening_a_device_fails_cleanly_or_succeeds() {
    match Context::new(0) {
        Ok(ctx) => notice(&format!("GPU present: {:?}", ctx.info())),
        Err(Error::NoDevice(e)) => notice(&format!(
            "no GPU here (cuInit: {e}): Context::new returns Error::NoDevice"
        )),
        Err(e @ Error::UnsupportedDevice { .. }) => notice(&format!("{e}")),
        Err(e) => panic!("unexpected error opening device 0: {e}"),
    }
}
