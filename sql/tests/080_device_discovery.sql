-- Device discovery: an agent registers a master it heard, for its owner, unassigned; it can
-- neither take over an existing device nor act for anyone else.
begin;
\ir fixtures/world.sql
select plan(8);

select tests.as_agent('pi-alice');
select results_eq($$select device_id, registered from register_discovered_device('ESP32_NEW_9', '1.4.2', '24:6F:28:00:00:99')$$,
  $$values ('ESP32_NEW_9'::text, true)$$,
  'a discovered master is registered');
select results_eq($$select device_id, registered from register_discovered_device('ESP32_NEW_9')$$,
  $$values ('ESP32_NEW_9'::text, false)$$, 'registering again is harmless');
select results_eq($$select device_id, registered from register_discovered_device('ESP32_BOB_1')$$,
  $$values ('ESP32_BOB_1'::text, false)$$,
  'a device of another owner is not taken over, and nothing of it is returned');
select throws_ok($$select * from register_discovered_device('bad id!')$$, '22023', null, 'a malformed device id is refused');

select tests.as_superuser();
select is((select owner_id::text from device_status where device_id = 'ESP32_BOB_1'), 'b0000000-0000-0000-0000-000000000002',
  'bob''s device still belongs to bob');
select results_eq($$select owner_id, agent_id, firmware_version from device_status where device_id = 'ESP32_NEW_9'$$,
  $$values ('a0000000-0000-0000-0000-000000000001'::uuid, null::text, '1.4.2'::text)$$,
  'the discovered master belongs to the agent''s owner, unassigned');

select tests.as_alice();
select is_empty($$select * from register_discovered_device('ESP32_NEW_10')$$, 'a dashboard user is not an agent');
select tests.as_agent('pi-revoked');
select is_empty($$select * from register_discovered_device('ESP32_NEW_11')$$, 'a revoked agent registers nothing');

select * from finish();
rollback;
