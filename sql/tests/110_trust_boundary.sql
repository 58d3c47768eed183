-- The trust boundary: a revoked agent reaches nothing; discovery reveals nothing of a device the
-- agent does not serve; only the caller that serves a master locks its commands; a completion
-- records relay states however it arrives; impossible times and wrong inserts are refused by name.
begin;
\ir fixtures/world.sql
select plan(47);

-- A master of alice that no agent serves (discovered, not yet adopted), with what an agent must
-- not learn of it.
insert into device_status (device_id, owner_id, agent_id, mac_address, ip_address, config) values
  ('ESP32_ALICE_U', 'a0000000-0000-0000-0000-000000000001', null, '24:6F:28:00:00:05', '10.0.0.5', '{"wifi_psk": "secret"}');
insert into system_status (owner_id, emergency_stop, emergency_reason)
  values ('a0000000-0000-0000-0000-000000000001', true, 'pump leak');

-- ---------------------------------------------------------------------------
-- 1. A revoked agent's token reaches nothing
-- ---------------------------------------------------------------------------
select tests.as_agent('pi-revoked');
select is((select count(*) from system_status), 0::bigint,
  'a revoked agent does not read its owner''s emergency stop');
select is_empty($$update system_status set emergency_stop = false returning owner_id$$,
  'a revoked agent cannot reset its owner''s emergency stop');
select throws_like($$insert into event_logs (owner_id, event_type, severity, message)
  values ('a0000000-0000-0000-0000-000000000001', 'emergency_stop', 'critical', 'forged')$$,
  '%row-level security%', 'a revoked agent cannot log a critical event for its owner');
select throws_ok('select autocore_hooks.check_request()', '42501',
  'edge_agent_refused: agent pi-revoked is revoked or not an agent of this owner',
  'the pre-request check refuses a revoked agent''s token');
select is(private.caller_kind(), null, 'a revoked agent''s token is nobody, not a user');
select tests.as_superuser();
delete from system_status;
select tests.as_agent('pi-revoked');
select throws_like($$insert into system_status (owner_id, emergency_stop)
  values ('a0000000-0000-0000-0000-000000000001', true)$$,
  '%row-level security%', 'a revoked agent cannot set its owner''s emergency stop');

-- An agent token naming an agent that does not exist, or another owner's agent, is nobody too.
select tests.act_as('authenticated', '{"role":"authenticated","sub":"a0000000-0000-0000-0000-000000000001","agent_id":"pi-ghost"}');
select throws_like($$insert into system_status (owner_id, emergency_stop)
  values ('a0000000-0000-0000-0000-000000000001', true)$$,
  '%row-level security%', 'a token naming an unknown agent cannot set the emergency stop');
select throws_ok('select autocore_hooks.check_request()', '42501', null, 'the pre-request check refuses an unknown agent');
select tests.act_as('authenticated', '{"role":"authenticated","sub":"a0000000-0000-0000-0000-000000000001","agent_id":"pi-bob"}');
select is(private.caller_kind(), null, 'a token naming another owner''s agent is nobody');

-- Live callers are untouched.
select tests.as_agent('pi-alice');
select lives_ok($$insert into system_status (owner_id, emergency_stop, emergency_reason)
  values ('a0000000-0000-0000-0000-000000000001', true, 'agent stop')$$, 'a live agent sets the emergency stop');
select isnt_empty($$update system_status set emergency_stop = false returning owner_id$$,
  'a live agent resets the emergency stop');
select lives_ok('select autocore_hooks.check_request()', 'the pre-request check lets a live agent through');
select tests.as_alice();
select lives_ok('select autocore_hooks.check_request()', 'the pre-request check lets a dashboard user through');
select tests.as_master('ESP32_ALICE_2');
select lives_ok('select autocore_hooks.check_request()', 'the pre-request check lets a master through');
select tests.as_anon();
select lives_ok('select autocore_hooks.check_request()', 'the pre-request check runs for anon (which still sees nothing)');
select tests.as_superuser();
select is((select setconfig from pg_db_role_setting s join pg_roles r on r.oid = s.setrole
            where r.rolname = 'authenticator' and s.setdatabase = 0),
  array['pgrst.db_pre_request=autocore_hooks.check_request'],
  'PostgREST runs the check before every request (in-database configuration)');
select is_empty($$select n.nspname || '.' || p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace
  where n.nspname in ('private', 'autocore_hooks') and p.proname <> 'check_request' and has_function_privilege('anon', p.oid, 'execute')$$,
  'anon may run no private function, only the pre-request check');

-- ---------------------------------------------------------------------------
-- 2. Discovery reveals nothing of a device the agent does not serve
-- ---------------------------------------------------------------------------
select tests.as_agent('pi-alice');
select results_eq($$select to_jsonb(r) from register_discovered_device('ESP32_ALICE_2', '9.9.9', '24:6F:28:00:00:22') r$$,
  $$values ('{"device_id": "ESP32_ALICE_2", "registered": false}'::jsonb)$$,
  'discovering a master another agent of the owner serves reveals nothing of it');
select results_eq($$select to_jsonb(r) from register_discovered_device('ESP32_ALICE_U') r$$,
  $$values ('{"device_id": "ESP32_ALICE_U", "registered": false}'::jsonb)$$,
  'discovering an unassigned master reveals nothing of it (no config, IP, MAC)');
select results_eq($$select to_jsonb(r) from register_discovered_device('ESP32_BOB_1') r$$,
  $$values ('{"device_id": "ESP32_BOB_1", "registered": false}'::jsonb)$$,
  'discovering another owner''s master reveals nothing of it');
select results_eq($$select to_jsonb(r) from register_discovered_device('ESP32_NEW_1', '1.0.0', '24:6F:28:00:00:31') r$$,
  $$values ('{"device_id": "ESP32_NEW_1", "registered": true}'::jsonb)$$,
  'a master heard for the first time is registered');
select tests.as_superuser();
select results_eq($$select agent_id, firmware_version, mac_address from device_status where device_id = 'ESP32_ALICE_2'$$,
  $$values ('pi-alice-2'::text, null::text, '24:6F:28:00:00:02'::text)$$,
  'the other agent''s master is left as it was');

-- ---------------------------------------------------------------------------
-- 3. Only the caller that serves a master locks its commands, and the lock names it
-- ---------------------------------------------------------------------------
select tests.command('ESP32_ALICE_1') as served \gset
select tests.command('ESP32_ALICE_U') as unserved \gset
select tests.as_alice();
select throws_ok($$select * from get_and_lock_slave_commands('ESP32_ALICE_1')$$, '42501',
  'command_lock_refused: ESP32_ALICE_1 is served by an edge agent; only that agent or the master itself may lock its commands',
  'a dashboard user cannot lock the commands of a master an agent serves');
select tests.as_superuser();
select is((select status || ' ' || delivery_count from relay_commands_slave where id = :served), 'pending 0',
  'the refused lock left the command for its agent');
select tests.as_bob();
select is_empty($$select * from get_and_lock_slave_commands('ESP32_ALICE_U')$$,
  'another owner gets nothing from an unassigned master, as from one that does not exist');
select tests.as_alice();
select results_eq(format('select id, locked_by from get_and_lock_slave_commands(%L)', 'ESP32_ALICE_U'),
  format($$values (%s::bigint, 'user:a0000000-0000-0000-0000-000000000001'::text)$$, :unserved),
  'the owner locks the commands of a master no agent serves, and the lock names the user');
select tests.as_master('ESP32_ALICE_1');
select results_eq($$select id, locked_by from get_and_lock_slave_commands('ESP32_ALICE_1')$$,
  format($$values (%s::bigint, 'device:ESP32_ALICE_1'::text)$$, :served),
  'a master locks its own commands even while an agent serves it, and the lock names the device');
select tests.as_superuser();
select tests.command('ESP32_ALICE_1') as served2 \gset
select tests.as_agent('pi-alice');
select results_eq($$select id, locked_by from get_and_lock_slave_commands('ESP32_ALICE_1')$$,
  format($$values (%s::bigint, 'agent:pi-alice'::text)$$, :served2),
  'the agent that serves the master locks, and the lock names the agent');
select tests.as_agent('pi-alice-2');
select is_empty($$select * from get_and_lock_slave_commands('ESP32_ALICE_1')$$,
  'a sibling agent gets nothing, as for a master that does not exist');

-- ---------------------------------------------------------------------------
-- 4. The seed's completion (a PATCH) records relay states; its relay_slaves update then works
-- ---------------------------------------------------------------------------
select tests.as_superuser();
insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_2', '14:33:5C:38:BF:61', '{0,2}', '{on,on}', '{60,0}') returning id as p1 \gset
insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_2', '14:33:5C:38:BF:61', '{2}', '{off}', '{0}') returning id as p2 \gset
insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_2', '14:33:5C:38:BF:61', '{5}', '{on}', '{0}') returning id as p3 \gset
select tests.as_master('ESP32_ALICE_2');
select is((select count(*)::int from get_and_lock_slave_commands('ESP32_ALICE_2', 10)), 3, 'the master locks its three commands');
update relay_commands_slave set status = 'completed', completed_at = now(), execution_time_ms = 150 where id = :p1;
select results_eq($$select relay_states from relay_slaves where master_device_id = 'ESP32_ALICE_2' and slave_mac_address = '14:33:5C:38:BF:61'$$,
  $$values ('{t,f,t,f,f,f,f,f}'::boolean[])$$,
  'the seed''s PATCH to completed records the slave''s relay states, creating its row');
select isnt_empty($$update relay_slaves set relay_states = '{t,f,t,f,f,f,f,f}', is_online = true
  where master_device_id = 'ESP32_ALICE_2' and slave_mac_address = '14:33:5C:38:BF:61' returning id$$,
  'the seed''s relay_slaves update then finds the row');
update relay_commands_slave set status = 'completed', execution_time_ms = 20 where id = :p2;
select results_eq($$select relay_states[1:3] from relay_slaves where slave_mac_address = '14:33:5C:38:BF:61'$$,
  $$values ('{t,f,f}'::boolean[])$$, 'a second PATCH applies its actions to the recorded states');
update relay_commands_slave set status = 'failed', error_message = 'no ack' where id = :p3;
select results_eq($$select relay_states from relay_slaves where slave_mac_address = '14:33:5C:38:BF:61'$$,
  $$values ('{t,f,f,f,f,f,f,f}'::boolean[])$$, 'a failed command records no relay states');
update relay_commands_slave set execution_time_ms = 25 where id = :p2;
select results_eq($$select relay_states from relay_slaves where slave_mac_address = '14:33:5C:38:BF:61'$$,
  $$values ('{t,f,f,f,f,f,f,f}'::boolean[])$$, 'only the change to completed records states, not a later edit');

-- ---------------------------------------------------------------------------
-- 5. A command cannot complete before it was created
-- ---------------------------------------------------------------------------
select tests.as_superuser();
select tests.command('ESP32_ALICE_2') as early \gset
select tests.as_master('ESP32_ALICE_2');
select throws_ok(format($$update relay_commands_slave set status = 'completed', completed_at = created_at - interval '1 minute' where id = %s$$, :early),
  '23514', 'new row for relation "relay_commands_slave" violates check constraint "relay_commands_slave_completed_after_created"',
  'completed_at before created_at is refused by a named constraint');
select tests.as_agent('pi-alice');
select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds,
    command_type, triggered_by, rule_id, status, created_at, completed_at)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}', 'rule', 'rule', 'R1', 'completed', now(), now() - interval '1 hour')$$,
  '%relay_commands_slave_completed_after_created%', 'an agent cannot report a command completed before it was created');
select lives_ok(format($$update relay_commands_slave set status = 'completed', completed_at = created_at where id = %s$$, :early),
  'completing at the creation time is fine');

-- ---------------------------------------------------------------------------
-- 6. A wrong insert says what is wrong, and another owner's master looks like no master at all
-- ---------------------------------------------------------------------------
select tests.as_alice();
select throws_ok($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_NOPE', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}')$$,
  '42501', 'relay_commands_slave_unknown_master: unknown device ESP32_NOPE',
  'a command for a master that does not exist names the device as unknown');
select throws_ok($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_BOB_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}')$$,
  '42501', 'relay_commands_slave_unknown_master: unknown device ESP32_BOB_1',
  'a command for another owner''s master gets exactly the same answer');
select throws_ok($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds, status)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}', 'queued')$$,
  '23514', 'relay_commands_slave_status_known: unknown status "queued"; one of pending, processing, sent, completed, failed, expired, cancelled',
  'a command with an unknown status is refused by name');
select throws_ok($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds, status)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}', 'completed')$$,
  '42501', 'relay_commands_slave_new_is_pending: a new command is pending; only an edge agent reports one it already ran',
  'a person cannot insert a command that claims to have run, and is told why');
select tests.as_agent('pi-alice-2');
select throws_ok($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}')$$,
  '42501', 'relay_commands_slave_unknown_master: unknown device ESP32_ALICE_1',
  'an agent cannot send to a master another agent serves');
select tests.as_master('ESP32_ALICE_2');
select throws_ok($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}')$$,
  '42501', 'relay_commands_slave_unknown_master: unknown device ESP32_ALICE_1',
  'a master cannot send to a sibling master');
select lives_ok($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_2', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}')$$, 'a master still queues a command for itself');
select tests.as_alice();
select lives_ok($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}')$$, 'a user still sends a command to her master');
select tests.as_agent('pi-revoked');
select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_R', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}')$$,
  'relay_commands_slave_unknown_master%', 'a revoked agent cannot send a command to the master it served');

select * from finish();
rollback;
