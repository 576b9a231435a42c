#!/usr/bin/perl
# Drives Gearman::Client (Debian libgearman-client-perl) for the compatibility matrix.
# Usage: client.pl SPEC.json; prints one JSON object (see compat_support.py for the fields).
use strict;
use warnings;
use Gearman::Client;
use JSON::PP;

local $/;
open(my $fh, '<', $ARGV[0]) or die "spec: $!";
my $spec = decode_json(<$fh>);
close $fh;

my $client = Gearman::Client->new(
    job_servers => [$spec->{server}],
    exceptions  => $spec->{exceptions} ? 1 : 0,
);

sub read_file {
    my ($path) = @_;
    open(my $in, '<:raw', $path) or die "$path: $!";
    my $data = <$in>;
    close $in;
    return defined $data ? $data : '';
}

my $workload = defined $spec->{workload_file} ? read_file($spec->{workload_file}) : '';
my %out;

if ($spec->{op} eq 'background') {
    my $handle = $client->dispatch_background($spec->{function}, \$workload,
        { uniq => $spec->{unique} });
    $out{handle} = $handle;
}
else {
    my $count = $spec->{op} eq 'pair' ? 2 : 1;
    my $ts = $client->new_task_set;
    my @runs;
    for my $i (0 .. $count - 1) {
        my $run = { status => [], data => [], warnings => [], failed => JSON::PP::false,
                    result => undef, exception => undef };
        push @runs, $run;
        my %opts = (
            on_complete  => sub { $run->{result} = unpack('H*', ${ $_[0] }) },
            on_fail      => sub { $run->{failed} = JSON::PP::true },
            on_status    => sub { push @{ $run->{status} }, [ map { 0 + $_ } @_[0, 1] ] },
            on_data      => sub { push @{ $run->{data} }, unpack('H*', ${ $_[0] }) },
            on_warning   => sub { push @{ $run->{warnings} }, unpack('H*', ${ $_[0] }) },
            on_exception => sub { $run->{exception} = "$_[0]" },
            timeout      => 60,
        );
        $opts{uniq} = $spec->{unique} if defined $spec->{unique};
        $ts->add_task($spec->{function}, \$workload, \%opts);
    }
    $ts->wait(timeout => 60);
    $out{runs} = \@runs;
}
print JSON::PP->new->canonical->encode(\%out), "\n";
