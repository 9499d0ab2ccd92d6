//! Streams and events.
#![allow(non_snake_case, clippy::missing_safety_doc)]

use super::*;

const CU_STREAM_NON_BLOCKING: c_uint = 1;

/// `cuStreamCreate`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(ph: *mut Handle, flags: c_uint) -> CuResult {
    unsafe { cuStreamCreateWithPriority(ph, flags, 0) }
}

/// `cuStreamCreateWithPriority`: priorities outside the range are clamped, as documented.
#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    ph: *mut Handle,
    flags: c_uint,
    priority: c_int,
) -> CuResult {
    ret(ctx().and_then(|c| {
        if flags & !CU_STREAM_NON_BLOCKING != 0 || ph.is_null() {
            return Err(err(CUDA_ERROR_INVALID_VALUE));
        }
        let s = Stream::new(
            c.clone(),
            flags & CU_STREAM_NON_BLOCKING == 0,
            false,
            priority.clamp(-5, 0),
        );
        c.add_stream(&s);
        unsafe { write(ph, streams().insert(s)) }
    }))
}

/// `cuStreamDestroy_v2`: work already queued still completes.
#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy_v2(h: Handle) -> CuResult {
    ret(initialised().and_then(|_| {
        let s = streams().destroy(h)?;
        s.close();
        Ok(())
    }))
}

/// `cuStreamSynchronize`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamSynchronize(h: Handle) -> CuResult {
    ret(stream(h).and_then(|s| match s.synchronize() {
        CUDA_SUCCESS => Ok(()),
        e => Err(err(e)),
    }))
}

/// `cuStreamQuery`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamQuery(h: Handle) -> CuResult {
    ret(stream(h).and_then(|s| {
        if s.done(s.enqueued()) {
            Ok(())
        } else {
            Err(err(CUDA_ERROR_NOT_READY))
        }
    }))
}

/// `cuStreamGetPriority`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamGetPriority(h: Handle, p: *mut c_int) -> CuResult {
    ret(stream(h).and_then(|s| unsafe { write(p, s.priority) }))
}

/// `cuStreamGetFlags`.
#[no_mangle]
pub unsafe extern "C" fn cuStreamGetFlags(h: Handle, f: *mut c_uint) -> CuResult {
    ret(stream(h).and_then(|s| unsafe { write(f, if s.blocking { 0 } else { 1 }) }))
}

/// `cuStreamIsCapturing`: graphs are not emulated, so never.
#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(h: Handle, status: *mut c_uint) -> CuResult {
    ret(stream(h).and_then(|_| unsafe { write(status, 0) }))
}

/// `cuStreamWaitEvent`: later work on the stream waits for the event's recorded work.
#[no_mangle]
pub unsafe extern "C" fn cuStreamWaitEvent(h: Handle, e: Handle, flags: c_uint) -> CuResult {
    ret(stream(h).and_then(|s| {
        if flags & !1 != 0 {
            return Err(err(CUDA_ERROR_INVALID_VALUE));
        }
        let ev = events().lookup(e)?;
        if let Some((es, seq)) = ev.point() {
            if !Arc::ptr_eq(&es, &s) {
                s.enqueue(Box::new(move || {
                    es.wait_for(seq);
                    Ok(())
                }));
            }
        }
        Ok(())
    }))
}

/// `cuLaunchHostFunc`: the function runs on the stream's thread in stream order.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchHostFunc(
    h: Handle,
    f: Option<unsafe extern "C" fn(*mut c_void)>,
    data: *mut c_void,
) -> CuResult {
    ret(stream(h).and_then(|s| {
        let f = f.ok_or_else(|| err(CUDA_ERROR_INVALID_VALUE))?;
        let data = data as usize;
        s.enqueue(Box::new(move || {
            // SAFETY: the caller's host function with its data, as cuLaunchHostFunc runs it.
            unsafe { f(data as *mut c_void) };
            Ok(())
        }));
        Ok(())
    }))
}

const CU_EVENT_DISABLE_TIMING: c_uint = 2;

/// `cuEventCreate`.
#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(ph: *mut Handle, flags: c_uint) -> CuResult {
    ret(ctx().and_then(|_| {
        if flags & !0xf != 0 {
            return Err(err(CUDA_ERROR_INVALID_VALUE));
        }
        let e = Event::new(flags & CU_EVENT_DISABLE_TIMING == 0);
        unsafe { write(ph, events().insert(e)) }
    }))
}

/// `cuEventDestroy_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(h: Handle) -> CuResult {
    ret(initialised().and_then(|_| events().destroy(h).map(|_| ())))
}

/// `cuEventRecord`.
#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(e: Handle, h: Handle) -> CuResult {
    ret(stream(h).and_then(|s| {
        let ev = events().lookup(e)?;
        ev.record(&s);
        Ok(())
    }))
}

/// `cuEventRecordWithFlags`.
#[no_mangle]
pub unsafe extern "C" fn cuEventRecordWithFlags(e: Handle, h: Handle, _flags: c_uint) -> CuResult {
    unsafe { cuEventRecord(e, h) }
}

/// `cuEventQuery`.
#[no_mangle]
pub unsafe extern "C" fn cuEventQuery(e: Handle) -> CuResult {
    ret(initialised().and_then(|_| {
        let ev = events().lookup(e)?;
        if ev.complete() {
            Ok(())
        } else {
            Err(err(CUDA_ERROR_NOT_READY))
        }
    }))
}

/// `cuEventSynchronize`.
#[no_mangle]
pub unsafe extern "C" fn cuEventSynchronize(e: Handle) -> CuResult {
    ret(initialised().and_then(|_| {
        let ev = events().lookup(e)?;
        ev.synchronize();
        match ev.point().map_or(CUDA_SUCCESS, |(s, _)| s.ctx.sticky()) {
            CUDA_SUCCESS => Ok(()),
            e => Err(err(e)),
        }
    }))
}

/// `cuEventElapsedTime`: milliseconds between two completed timing events.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, start: Handle, end: Handle) -> CuResult {
    ret(initialised().and_then(|_| {
        let a = events().lookup(start)?;
        let b = events().lookup(end)?;
        if !a.timing || !b.timing {
            return Err(err(CUDA_ERROR_INVALID_HANDLE));
        }
        if !a.complete() || !b.complete() {
            return Err(err(CUDA_ERROR_NOT_READY));
        }
        let (Some(ta), Some(tb)) = (a.time(), b.time()) else {
            return Err(err(CUDA_ERROR_INVALID_HANDLE));
        };
        let d = if tb >= ta {
            (tb - ta).as_secs_f32()
        } else {
            -(ta - tb).as_secs_f32()
        };
        unsafe { write(ms, d * 1e3) }
    }))
}

/// `cuEventElapsedTime_v2`.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    start: Handle,
    end: Handle,
) -> CuResult {
    unsafe { cuEventElapsedTime(ms, start, end) }
}
