-- Completion and failure of a command, and the slave's relay states, as markCommandCompleted does.
begin;
\ir fixtures/world.sql
select plan(14);

insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0,2}', '{on,on}', '{60,0}') returning id as c1 \gset
insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{2}', '{off}', '{0}') returning id as c2 \gset
insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{1}', '{on}', '{10}') returning id as c3 \gset
select tests.command('ESP32_ALICE_1', 'manual', 10, now() - interval '10 minutes', now() - interval '1 second') as stale \gset

select tests.as_agent('pi-alice');
select is((select count(*)::int from get_and_lock_slave_commands('ESP32_ALICE_1', 10)), 3, 'three commands are locked');

select results_eq(format('select status, execution_time_ms from complete_slave_command(%s, 150)', :c1),
  $$values ('completed'::text, 150)$$, 'completion returns the completed command with its execution time');
select isnt((select completed_at from relay_commands_slave where id = :c1), null, 'completion sets completed_at');
select results_eq('select relay_states from relay_slaves where slave_mac_address = ''14:33:5C:38:BF:60''',
  $$values ('{t,f,t,f,f,f,f,f}'::boolean[])$$, 'the slave''s relays 0 and 2 are on after the first command (8 relays known)');
select results_eq(format('select status, execution_time_ms from complete_slave_command(%s, 999)', :c1),
  $$values ('completed'::text, 150)$$, 'completing twice changes nothing and returns the first result');
select lives_ok(format('select complete_slave_command(%s, 20)', :c2), 'the second command completes');
select results_eq('select relay_states[1:3] from relay_slaves where slave_mac_address = ''14:33:5C:38:BF:60''',
  $$values ('{t,f,f}'::boolean[])$$, 'relay 2 is off after the off command, relay 0 still on');
select lives_ok(format('select complete_slave_command(%s, 20, %L)', :c3, '{f,t,f,f,f,f,f,f}'),
  'a completion may report the slave''s whole relay state');
select results_eq('select relay_states from relay_slaves where slave_mac_address = ''14:33:5C:38:BF:60''',
  $$values ('{f,t,f,f,f,f,f,f}'::boolean[])$$, 'the reported relay states replace the computed ones');

insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{3}', '{on}', '{10}') returning id as c4 \gset
select results_eq(format('select status, error_message from fail_slave_command(%s, %L)', :c4, 'slave offline'),
  $$values ('failed'::text, 'slave offline'::text)$$, 'failure records the reason');
select results_eq(format('select status from complete_slave_command(%s, 5)', :c4),
  $$values ('failed'::text)$$, 'a failed command cannot be completed afterwards; the caller learns it failed');
select is((select status from relay_commands_slave where id = :stale), 'expired', 'the stale command was expired when locking');
select results_eq(format('select status from complete_slave_command(%s, 5)', :stale),
  $$values ('expired'::text)$$, 'an expired command stays expired when someone tries to complete it');
select throws_ok(format('select fail_slave_command(%s, %L)', :c4, ''), '22023', 'p_error_message is required',
  'a failure without a reason is refused');

select * from finish();
rollback;
