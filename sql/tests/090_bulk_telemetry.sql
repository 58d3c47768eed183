-- insert_telemetry: bulk readings for the caller's own devices, idempotent, refused whole for a
-- device the caller may not see.
begin;
\ir fixtures/world.sql
select plan(7);

select tests.as_agent('pi-alice');
select is(insert_telemetry($$[
  {"device_id":"ESP32_ALICE_1","sensor_key":"ph","value":6.4,"unit":"pH","recorded_at":"2026-11-22T00:00:00Z"},
  {"device_id":"ESP32_ALICE_1","sensor_key":"ph","value":6.3,"unit":"pH","recorded_at":"2026-11-22T00:00:01Z"}]$$),
  2, 'an agent stores a batch of its master''s readings');
select is(insert_telemetry($$[
  {"device_id":"ESP32_ALICE_1","sensor_key":"ph","value":6.4,"unit":"pH","recorded_at":"2026-11-22T00:00:00Z"},
  {"device_id":"ESP32_ALICE_1","sensor_key":"ph","value":6.2,"unit":"pH","recorded_at":"2026-11-22T00:00:02Z"}]$$),
  1, 'a retried batch stores only what is new');
select throws_ok($$select insert_telemetry('[{"device_id":"ESP32_ALICE_2","sensor_key":"ph","value":1,"recorded_at":"2026-11-22T00:00:00Z"}]')$$,
  '42501', 'no access to device ESP32_ALICE_2', 'another agent''s master is refused, whole batch');
select throws_ok($$select insert_telemetry('{}')$$, '22023', 'p_readings must be a JSON array of readings', 'a non-array is refused');
select throws_like($$select insert_telemetry('[{"device_id":"ESP32_ALICE_1","sensor_key":"bad key!","value":1,"recorded_at":"2026-11-22T00:00:00Z"}]')$$,
  '%telemetry_data_sensor_key_format%', 'the table''s constraints still hold');
select tests.as_alice();
select throws_ok($$select insert_telemetry('[]')$$, '42501', 'only an agent or a master pushes telemetry', 'a dashboard user cannot forge telemetry');
select tests.as_superuser();
select is((select count(*) from telemetry_data where device_id = 'ESP32_ALICE_1'), 3::bigint, 'three readings stored in all');

select * from finish();
rollback;
