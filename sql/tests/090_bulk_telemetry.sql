-- insert_telemetry: bulk readings for the caller's own devices, idempotent, refused whole for a
-- device the caller may not see.
begin;
\ir fixtures/world.sql
select plan(9);

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
select is(insert_telemetry(format($$[
  {"device_id":"ESP32_ALICE_1","sensor_key":"flow","value":1.5,"unit":"%s","recorded_at":"2026-11-22T00:00:03Z"}]$$,
  repeat('µ', 128))::jsonb), 1, 'a unit of 256 bytes, as PROTOCOL.md allows, is stored');
select throws_like(format($$select insert_telemetry('[
  {"device_id":"ESP32_ALICE_1","sensor_key":"flow","value":1.5,"unit":"%s","recorded_at":"2026-11-22T00:00:04Z"}]')$$,
  repeat('x', 257)), '%telemetry_data_unit_length%', 'a unit over 256 bytes is refused, as the protocol refuses it');
select tests.as_alice();
select throws_ok($$select insert_telemetry('[]')$$, '42501', 'only an agent or a master pushes telemetry', 'a dashboard user cannot forge telemetry');
select tests.as_superuser();
select is((select count(*) from telemetry_data where device_id = 'ESP32_ALICE_1'), 4::bigint, 'four readings stored in all');

select * from finish();
rollback;
