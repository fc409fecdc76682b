//! The hook's stdin as the calling Nix writes it: the settings preamble, then `try` requests,
//! then (after `# accept`) the input paths and wanted outputs. Asserts: no panic; whatever
//! decodes, re-encoded, decodes to the same value.
#![no_main]

use bytes::BytesMut;
use hook_protocol::hook::{self, HookRequest};
use libfuzzer_sys::fuzz_target;
use nixdock_fuzz::block_on;

/// Requests read from one input at most (each needs at least 8 bytes anyway).
const MAX_REQUESTS: usize = 64;

fuzz_target!(|data: &[u8]| {
    block_on(async {
        // As the hook reads it when it declines: preamble, then requests until EOF.
        let mut r = data;
        let Ok(settings) = hook::read_settings(&mut r).await else {
            return;
        };
        let mut buf = BytesMut::new();
        settings.write(&mut buf);
        let again = hook::read_settings(&mut &buf[..])
            .await
            .expect("re-read settings");
        assert_eq!(again, settings);
        // The typed accessors parse values the parent wrote.
        let _ = (
            settings.system(),
            settings.extra_platforms(),
            settings.system_features(),
            settings.max_jobs(),
            settings.builders(),
            settings.max_silent_time(),
            settings.timeout(),
            settings.max_build_log_size(),
            settings.substituters(),
            settings.experimental_features(),
            settings.use_case_hack(),
        );
        let mut first_try_end = None;
        for _ in 0..MAX_REQUESTS {
            match hook::read_request(&mut r).await {
                Ok(HookRequest::Try(t)) => {
                    first_try_end.get_or_insert(r);
                    let mut buf = BytesMut::new();
                    t.write(&mut buf);
                    let again = hook::read_request(&mut &buf[..])
                        .await
                        .expect("re-read try");
                    assert_eq!(again, HookRequest::Try(t));
                }
                Ok(HookRequest::Exit) | Err(_) => break,
            }
        }
        // As the hook reads it when it accepts the first `try`: the post-accept data.
        if let Some(mut r) = first_try_end
            && let Ok(work) = hook::read_accepted(&mut r).await
        {
            let mut buf = BytesMut::new();
            work.write(&mut buf);
            let again = hook::read_accepted(&mut &buf[..])
                .await
                .expect("re-read accepted");
            assert_eq!(again.inputs, work.inputs);
            assert_eq!(again.wanted_outputs, work.wanted_outputs);
        }
    });
});
