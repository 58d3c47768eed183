-- Telemetry rollups, retention and the flight recorder (decision 0013): figures right, a second
-- run changes nothing, a late reading reaches its bucket, retention keeps the windows around
-- firings and stops and deletes the rest per owner, and clients read only their own and write
-- none of it.
begin;
\ir fixtures/world.sql
select plan(57);

-- Times relative to this transaction's now(): h0 is the start of a UTC hour two hours back, so
-- its minutes and the hour itself are closed.
create temp table t0 as select date_trunc('hour', now(), 'UTC') - interval '2 hours' as h0;
grant select on t0 to public;
create function pg_temp.h0() returns timestamptz language sql stable as $$ select h0 from t0 $$;

-- ---------------------------------------------------------------------------
-- Shape and rights
-- ---------------------------------------------------------------------------

select has_table('public', t, t || ' exists') from unnest(array[
  'telemetry_rollup_1m', 'telemetry_rollup_1h', 'retention_settings', 'flight_recordings',
  'flight_recorder_readings']) t;
select ok(not has_function_privilege(r, f, 'execute'), r || ' cannot run ' || f)
  from unnest(array['anon', 'authenticated']) r,
       unnest(array['private.telemetry_rollup_1m()', 'private.telemetry_rollup_1h()',
                    'private.telemetry_retention()']) f;
select is(
  (select array_agg(jobname || ' ' || schedule || ' ' || command order by jobname) from cron.job
    where jobname like 'autocore-telemetry-%'),
  array['autocore-telemetry-retention 17 3 * * * select private.telemetry_retention()',
        'autocore-telemetry-rollup-1h 3 * * * * select private.telemetry_rollup_1h()',
        'autocore-telemetry-rollup-1m * * * * * select private.telemetry_rollup_1m()'],
  'pg_cron runs the minute rollup every minute, the hour rollup hourly, retention daily');

-- ---------------------------------------------------------------------------
-- Rollups
-- ---------------------------------------------------------------------------

-- Alice's master: minute 0 of h0 holds 6.0, 6.6, 6.3 (in that order of time); minute 1 holds 7.0.
-- Bob's master: one reading. Pushed by the agents, as in production.
select tests.as_agent('pi-alice');
select is(insert_telemetry(jsonb_build_array(
  jsonb_build_object('device_id', 'ESP32_ALICE_1', 'sensor_key', 'ph', 'value', 6.6, 'unit', 'pH', 'recorded_at', pg_temp.h0() + interval '20 s'),
  jsonb_build_object('device_id', 'ESP32_ALICE_1', 'sensor_key', 'ph', 'value', 6.0, 'unit', 'pH', 'recorded_at', pg_temp.h0()),
  jsonb_build_object('device_id', 'ESP32_ALICE_1', 'sensor_key', 'ph', 'value', 6.3, 'unit', 'pH', 'recorded_at', pg_temp.h0() + interval '40 s'),
  jsonb_build_object('device_id', 'ESP32_ALICE_1', 'sensor_key', 'ph', 'value', 7.0, 'unit', 'pH', 'recorded_at', pg_temp.h0() + interval '1 min 5 s'))),
  4, 'alice''s agent pushes four readings');
select throws_ok(
  $$insert into telemetry_data (device_id, sensor_key, value, recorded_at, received_at)
    values ('ESP32_ALICE_1', 'ph', 6.1, now(), now() - interval '1 day')$$,
  '42501', null, 'a client cannot set received_at (the rollups find late readings by it)');
select tests.as_agent('pi-bob');
select is(insert_telemetry(jsonb_build_array(
  jsonb_build_object('device_id', 'ESP32_BOB_1', 'sensor_key', 'temp', 'value', 21.5, 'recorded_at', pg_temp.h0()))),
  1, 'bob''s agent pushes one reading');
select tests.as_superuser();

select is((private.telemetry_rollup_1m() ->> 'minutes_changed')::int, 3, 'the minute rollup writes three minutes');
select is((private.telemetry_rollup_1h() ->> 'hours_changed')::int, 2, 'the hour rollup writes two hours');

select row_eq(
  $$select min_value, max_value, round(avg_value::numeric, 6), last_value, unit, sample_count
      from telemetry_rollup_1m where device_id = 'ESP32_ALICE_1' and sensor_key = 'ph' and bucket = pg_temp.h0()$$,
  row(6.0::float8, 6.6::float8, 6.3::numeric, 6.3::float8, 'pH'::text, 3),
  'minute 0: min 6.0, max 6.6, avg 6.3, last 6.3 (the latest by time, not by arrival), count 3');
select row_eq(
  $$select min_value, max_value, round(avg_value::numeric, 6), last_value, sample_count
      from telemetry_rollup_1h where device_id = 'ESP32_ALICE_1' and sensor_key = 'ph' and bucket = pg_temp.h0()$$,
  row(6.0::float8, 7.0::float8, 6.475::numeric, 7.0::float8, 4),
  'hour h0: min 6.0, max 7.0, avg 6.475, last 7.0, count 4');

create temp table before_rerun as
  select 'm' as level, to_jsonb(r) as row from telemetry_rollup_1m r
  union all select 'h', to_jsonb(r) from telemetry_rollup_1h r;
select is((private.telemetry_rollup_1m() ->> 'minutes_changed')::int, 0, 'a second minute rollup changes no minute');
select is((private.telemetry_rollup_1h() ->> 'hours_changed')::int, 0, 'a second hour rollup changes no hour');
select set_eq(
  $$select 'm' as level, to_jsonb(r) from telemetry_rollup_1m r union all select 'h', to_jsonb(r) from telemetry_rollup_1h r$$,
  $$select level, row from before_rerun$$,
  'after running twice the rollups are exactly as after once (rolled_at included)');

-- A late reading for minute 0, arriving now: found by its arrival, its minute and hour redone.
select tests.as_agent('pi-alice');
select is(insert_telemetry(jsonb_build_array(
  jsonb_build_object('device_id', 'ESP32_ALICE_1', 'sensor_key', 'ph', 'value', 5.0, 'unit', 'pH', 'recorded_at', pg_temp.h0() + interval '10 s'))),
  1, 'a late reading for an already rolled minute arrives');
select tests.as_superuser();
select is((private.telemetry_rollup_1m() ->> 'minutes_changed')::int, 1, 'the late reading changes its minute');
select is((private.telemetry_rollup_1h() ->> 'hours_changed')::int, 1, 'and its hour');
select row_eq(
  $$select min_value, sample_count, last_value from telemetry_rollup_1m
     where device_id = 'ESP32_ALICE_1' and sensor_key = 'ph' and bucket = pg_temp.h0()$$,
  row(5.0::float8, 4, 6.3::float8), 'minute 0 now has min 5.0 and count 4, last still 6.3');
select row_eq(
  $$select min_value, sample_count from telemetry_rollup_1h
     where device_id = 'ESP32_ALICE_1' and sensor_key = 'ph' and bucket = pg_temp.h0()$$,
  row(5.0::float8, 5), 'hour h0 now has min 5.0 and count 5');

-- The open minute is not rolled; it waits, and is rolled once it closes (not testable inside one
-- transaction's clock), but it must not appear early.
insert into telemetry_data (device_id, sensor_key, value, recorded_at)
  values ('ESP32_ALICE_1', 'ph', 6.9, now() + interval '1 hour');
select private.telemetry_rollup_1m() is not null as ran;
select is((select count(*) from telemetry_rollup_1m where bucket > now()), 0::bigint, 'an open minute is not rolled up');
select is((select count(*) from private.rollup_pending where level = '1m' and bucket > now()), 1::bigint,
  'it stays pending until it closes');
delete from telemetry_data where recorded_at > now();
delete from private.rollup_pending where bucket > now();

-- ---------------------------------------------------------------------------
-- Rollups under RLS
-- ---------------------------------------------------------------------------

select tests.as_alice();
select is((select count(*) from telemetry_rollup_1m), 2::bigint, 'alice reads her two minutes');
select is((select count(*) from telemetry_rollup_1h), 1::bigint, 'and her hour');
select throws_ok($$insert into telemetry_rollup_1h (device_id, sensor_key, bucket, min_value, max_value, avg_value,
    last_value, sample_count, last_recorded_at, rolled_at)
    values ('ESP32_ALICE_1', 'ph', now(), 0, 0, 0, 0, 1, now(), now())$$,
  '42501', null, 'a dashboard user cannot write a rollup');
select throws_ok($$update telemetry_rollup_1m set max_value = 99$$, '42501', null, 'nor change one');
select throws_ok($$delete from telemetry_rollup_1h$$, '42501', null, 'nor delete one');
select tests.as_agent('pi-alice');
select throws_ok($$update telemetry_rollup_1m set max_value = 99$$, '42501', null, 'nor can an agent');
select tests.as_bob();
select is((select count(*) from telemetry_rollup_1m where device_id like 'ESP32_ALICE%'), 0::bigint,
  'bob sees none of alice''s rollups');
select is((select count(*) from telemetry_rollup_1h), 1::bigint, 'only his own hour');
select tests.as_anon();
select throws_ok($$select count(*) from telemetry_rollup_1h$$, '42501', null, 'anon reads nothing');

-- ---------------------------------------------------------------------------
-- Per-owner settings
-- ---------------------------------------------------------------------------

select tests.as_bob();
select lives_ok($$insert into retention_settings (raw_days, events_days) values (10, 2)$$,
  'bob keeps raw readings 10 days and events 2 (owner from his token)');
select throws_like($$update retention_settings set raw_days = 0$$, '%retention_settings_raw_days_range%',
  'a retention of 0 days is refused, naming the bound');
select throws_ok($$insert into retention_settings (owner_id, raw_days) values ('a0000000-0000-0000-0000-000000000001', 1)$$,
  '42501', null, 'bob cannot set alice''s retention');
select tests.as_alice();
select lives_ok($$insert into retention_settings (rollup_1m_days) values (60)$$, 'alice keeps minute rollups 60 days');
select is((select count(*) from retention_settings), 1::bigint, 'alice reads only her own settings');
select tests.as_agent('pi-alice');
select is((select count(*) from retention_settings), 0::bigint, 'an agent reads no settings');
select tests.as_superuser();

-- ---------------------------------------------------------------------------
-- Retention and the flight recorder
-- ---------------------------------------------------------------------------

-- Nine days back, one reading every 30 s for an hour on alice's two masters and bob's; a rule
-- firing on ESP32_ALICE_1 at +20 min and an emergency stop of alice's agent at +40 min (5 + 5
-- minute windows by default), and the same firing on bob's master.
create temp table old as select now() - interval '9 days' as t;
insert into telemetry_data (device_id, sensor_key, value, recorded_at)
select d, 'ph', 6 + i / 1000.0, (select t from old) + i * interval '30 s'
  from unnest(array['ESP32_ALICE_1', 'ESP32_ALICE_2', 'ESP32_BOB_1']) d, generate_series(0, 119) i;
insert into rule_executions (client_id, agent_id, device_id, rule_uuid, rule_id, priority, executed_at, result, explanation)
values (gen_random_uuid(), 'pi-alice', 'ESP32_ALICE_1', gen_random_uuid(), 'R1', 50, (select t from old) + interval '20 min', 'executed', 'ph low'),
       (gen_random_uuid(), 'pi-bob', 'ESP32_BOB_1', gen_random_uuid(), 'R1', 50, (select t from old) + interval '20 min', 'executed', 'ph low');
insert into event_logs (agent_id, event_type, severity, source, message, occurred_at)
values ('pi-alice', 'emergency_stop', 'critical', 'agent', 'stop', (select t from old) + interval '40 min'),
       ('pi-alice', 'backend_outage', 'warning', 'agent', 'outage', now() - interval '3 days'),
       ('pi-bob', 'backend_outage', 'warning', 'agent', 'outage', now() - interval '3 days');

select private.telemetry_retention() is not null as ran;

select is((select count(*) from telemetry_data where device_id like 'ESP32_ALICE%' and recorded_at < now() - interval '7 days'),
  0::bigint, 'alice''s raw readings older than 7 days are deleted');
select is((select count(*) from telemetry_data where device_id = 'ESP32_BOB_1' and recorded_at < now() - interval '7 days'),
  120::bigint, 'bob''s are kept: he keeps 10 days');
select is((select count(*) from telemetry_data where recorded_at >= now() - interval '1 day'), 6::bigint,
  'recent readings are untouched');
select set_eq(
  $$select f.anchor, r.device_id, count(*) as n, min(r.recorded_at) - f.anchor_at as first,
           max(r.recorded_at) - f.anchor_at as last
      from flight_recordings f join flight_recorder_readings r on r.recording_id = f.id
     group by f.id, f.anchor, r.device_id, f.anchor_at$$,
  $$values ('rule_firing', 'ESP32_ALICE_1', 21::bigint, interval '-5 min', interval '5 min'),
           ('emergency_stop', 'ESP32_ALICE_1', 21::bigint, interval '-5 min', interval '5 min'),
           ('emergency_stop', 'ESP32_ALICE_2', 21::bigint, interval '-5 min', interval '5 min')$$,
  'the firing keeps its master''s readings 5 min either side, the stop all of alice''s masters''; bob''s firing none (deleted with his 2-day events)');
select is((select count(*) from flight_recordings where complete), 2::bigint, 'both windows are complete');
select is((select array_agg(agent_id) from event_logs where message = 'outage'), array['pi-alice'],
  'bob''s 3-day-old event is deleted (he keeps 2 days), alice''s kept (30 days)');
select is((select array_agg(agent_id) from rule_executions), array['pi-alice'],
  'bob''s 9-day-old rule firing is deleted, alice''s kept');

create temp table after_first as
  select 'raw' as what, count(*) as n from telemetry_data
  union all select 'flight', count(*) from flight_recorder_readings
  union all select 'events', count(*) from event_logs
  union all select 'firings', count(*) from rule_executions;
select is(
  (select jsonb_build_object('raw', r ->> 'raw_deleted', 'copied', r ->> 'flight_readings_copied',
                             'created', r ->> 'flight_recordings_created', 'events', r ->> 'events_deleted')
     from (select private.telemetry_retention() r) x),
  '{"raw": "0", "copied": "0", "created": "0", "events": "0"}'::jsonb, 'a second retention run does nothing');
select set_eq($$select 'raw' as what, count(*) as n from telemetry_data union all select 'flight', count(*) from flight_recorder_readings
               union all select 'events', count(*) from event_logs union all select 'firings', count(*) from rule_executions$$,
  $$select what, n from after_first$$, 'and leaves every table as it was');

-- A late reading from behind the horizon (its minute's other readings are gone) leaves the
-- minute's figures alone.
update telemetry_rollup_1m set sample_count = 60
 where device_id = 'ESP32_ALICE_1' and bucket = date_trunc('minute', (select t from old), 'UTC');
insert into telemetry_data (device_id, sensor_key, value, recorded_at) values ('ESP32_ALICE_1', 'ph', 42, (select t from old));
select private.telemetry_rollup_1m() is not null as ran;
select is((select sample_count from telemetry_rollup_1m where device_id = 'ESP32_ALICE_1'
            and bucket = date_trunc('minute', (select t from old), 'UTC')), 60,
  'a reading older than the raw horizon does not overwrite its minute');

-- The flight recording goes with its firing.
select tests.as_alice();
select is((select count(*) from flight_recorder_readings), 63::bigint, 'alice reads her flight recorder');
select tests.as_bob();
select is((select count(*) from flight_recorder_readings), 0::bigint, 'bob reads none of it');
select tests.as_superuser();
update retention_settings set events_days = 1 where owner_id = 'a0000000-0000-0000-0000-000000000001';
select private.telemetry_retention() is not null as ran;
select is((select count(*) from flight_recorder_readings), 0::bigint,
  'when the firing and the stop are deleted, their recordings go with them');

select * from finish();
rollback;
