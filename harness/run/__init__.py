"""argv → points → one record each: composing and checking points (compose), the job of one
point (job) and what it measures with (timing, memory, contention, opcount, inputs — with
replay, capture and real for recorded q, k, v), `plan`, `capture`."""
